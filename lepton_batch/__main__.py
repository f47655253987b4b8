"""``python -m lepton_batch`` runs the CLI."""

from lepton_batch.cli.app import main

if __name__ == "__main__":
    main()
