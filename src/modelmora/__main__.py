"""`python -m modelmora` runs the CLI."""

from modelmora.cli import main

main()
