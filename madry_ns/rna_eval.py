"""Earlier name of `madry_ns.studies.rna`: `import madry_ns.rna_eval` gives that very module (so
patches made through either name are one)."""

import sys

from madry_ns.studies import rna as _study

sys.modules[__name__] = _study
