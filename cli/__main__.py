"""``python -m cli`` runs the labkeeper command line."""

from cli.main import main

main()
