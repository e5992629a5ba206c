"""``python -m ldpipe`` (also what ``torchrun -m ldpipe`` runs)."""
from .cli import main

main(prog_name="ldpipe")
