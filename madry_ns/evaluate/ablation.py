"""Earlier name of `madry_ns.studies.shaping` (Table IV): `import madry_ns.evaluate.ablation`
gives that very module."""

import sys

from madry_ns.studies import shaping as _study

sys.modules[__name__] = _study
