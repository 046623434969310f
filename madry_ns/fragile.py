"""Earlier name of `madry_ns.studies.fragile`: `import madry_ns.fragile` gives that very module
(so settings and patches made through either name are one), and `python -m madry_ns.fragile`
runs its command."""

import sys

from madry_ns.studies import fragile as _study

if __name__ == "__main__":
    sys.exit(_study.main(prog="python -m madry_ns.fragile"))
sys.modules[__name__] = _study
