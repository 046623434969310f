"""Earlier name of `madry_ns.studies.rna`: `import madry_ns.rna_eval` gives that very module (so
patches made through either name are one), and `python -m madry_ns.rna_eval` runs its
command."""

import sys

from madry_ns.studies import rna as _study

if __name__ == "__main__":
    sys.exit(_study.main(prog="python -m madry_ns.rna_eval"))
sys.modules[__name__] = _study
