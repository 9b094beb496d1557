"""``python -m gator_hw`` (also what ``torchrun -m gator_hw`` runs)."""

from gator_hw.cli import main

if __name__ == "__main__":
    main()
