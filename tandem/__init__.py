"""tandem: train a reasoning chatbot on one accelerator, serve it on another, survive faulty chips.

Entry point: the `tandem` command (tandem/cli/). docs/ARCHITECTURE.md has the map.
"""

__version__ = "0.1.0"
