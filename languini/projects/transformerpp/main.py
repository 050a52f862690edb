"""Train this project: `python main.py [PRESET] [--flags]`, or under torchrun for several processes.

    torchrun --standalone --nproc_per_node 2 languini/projects/<project>/main.py small --train_batch_size 128

The project is the folder this file lives in (its project.py), so a folder copied by hand trains its own
model with no renaming. `--help` lists the presets and every flag.
"""

import sys

from languini.projects.commands import train_project


def main(argv=None):
    return train_project(__file__, argv)


if __name__ == "__main__":
    sys.exit(main())
