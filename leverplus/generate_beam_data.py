"""``python -m leverplus.generate_beam_data``: the data-generation app (code in :mod:`leverplus.datagen.generate_beam_data`)."""

from leverplus.datagen.generate_beam_data import main, merge_main
from leverplus.datagen.generation import dispatch_cli

if __name__ == "__main__":
    dispatch_cli(merge_main, main)
