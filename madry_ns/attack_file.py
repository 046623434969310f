"""Attack files (`attack.npy`): naming, safe loading and Madry's validity checks.

Madry's `run_attack.py` accepts an attack when the array has shape (10000, 32, 32, 3),
every pixel lies in [0, 255] and no pixel moved more than epsilon from the clean test image,
each with a tolerance of 1e-4, and answers a failed check with one line in his words. The
checks here are the same, in the same order and words, with the expected shape following
`num_eval_examples` and the dataset's image shape (32x32x3 for CIFAR-10, as Madry's). Beyond
Madry: the file is loaded without unpickling (a pickled or object array is refused, as
unpickling can run code), a missing file is a message rather than a traceback, non-numeric
arrays are refused, and NaN or infinite pixels are refused
(Madry's range check lets NaN through, because comparisons with NaN are false; his MNIST
script did check for NaN). Integer and float arrays of any width are accepted, as Madry's.

Every check raises `AttackFileError` (exit status 2 in the scripts); this module imports no
TensorFlow, so it can be tested and fuzzed quickly.
"""

from __future__ import annotations

import os

import numpy as np

from madry_ns.errors import AttackFileError

# Madry: `np.amax(x_adv) > 255.0001 or np.amin(x_adv) < -0.0001`; `l_inf > epsilon + 0.0001`.
TOLERANCE = 1e-4
PIXEL_MIN, PIXEL_MAX = 0.0, 255.0


def npy_path(path: str) -> str:
    """The file `np.save(path, ...)` writes: `path`, with `.npy` appended when it lacks it.

    pgd_attack.py writes and run_attack.py reads this same name, so a `store_adv_path`
    without the extension works for both (with Madry's scripts it did not: np.save added
    `.npy` and np.load looked for the bare name).
    """
    return path if path.endswith(".npy") else path + ".npy"


def load(path: str) -> np.ndarray:
    """Load an attack file written by `numpy.save`, refusing anything that needs unpickling.

    Reads `npy_path(path)`, or `path` itself when only that exists.
    """
    candidates = [npy_path(path)] + ([path] if npy_path(path) != path else [])
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        raise AttackFileError(
            f"attack file '{candidates[0]}' not found (store_adv_path is '{path}', relative "
            f"to the working directory {os.getcwd()}); run `python pgd_attack.py` first or "
            f"set store_adv_path to your attack file")
    try:
        loaded = np.load(found, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower() or "object arrays" in str(e).lower():
            raise AttackFileError(
                f"attack file '{found}' holds pickled data (a pickle, or a numpy array of "
                f"Python objects); it was not loaded, since unpickling can run code. Save a "
                f"numeric array with numpy.save(path, x_adv.astype(np.float64))") from None
        raise AttackFileError(f"attack file '{found}' is not a readable .npy file "
                              f"({e})") from None
    except (OSError, EOFError) as e:
        raise AttackFileError(f"attack file '{found}' cannot be read; it may be truncated "
                              f"({type(e).__name__}: {e})") from None
    if not isinstance(loaded, np.ndarray):  # an .npz archive
        loaded.close()
        raise AttackFileError(f"attack file '{found}' is an .npz archive; expected a single "
                              f"array saved with numpy.save")
    return loaded


CIFAR10_SHAPE = (32, 32, 3)


def expected_shape(num_examples: int, image_shape: tuple = CIFAR10_SHAPE) -> tuple:
    """(num_examples, H, W, C): the first num_examples test images of a dataset whose images
    are `image_shape` (Madry's (10000, 32, 32, 3) for CIFAR-10's defaults)."""
    return (num_examples, *tuple(image_shape))


def check_array(x_adv: np.ndarray, num_examples: int,
                image_shape: tuple = CIFAR10_SHAPE) -> None:
    """Madry's shape and pixel-range checks, in his words, plus dtype and NaN/inf checks."""
    shape = expected_shape(num_examples, image_shape)
    if x_adv.shape != shape:
        raise AttackFileError(f"Invalid shape: expected {shape}, found {x_adv.shape}")
    if x_adv.dtype.kind not in "iuf":
        raise AttackFileError(f"Invalid dtype: expected a numeric array (float or integer "
                              f"pixels on the 0-255 scale), found {x_adv.dtype}")
    finite = np.isfinite(x_adv)
    if not finite.all():
        nan = int(np.isnan(x_adv).sum())
        inf = int(x_adv.size - finite.sum()) - nan
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise AttackFileError(f"Invalid pixel values: found {nan} NaN and {inf} infinite "
                              f"pixels (the first at index {first}); every pixel must be a "
                              f"finite number in [0, 255]")
    low, high = np.amin(x_adv), np.amax(x_adv)
    if high > PIXEL_MAX + TOLERANCE or low < PIXEL_MIN - TOLERANCE:
        raise AttackFileError(f"Invalid pixel range. Expected [0, 255], found [{low}, {high}]")


def max_perturbation(x_adv: np.ndarray, x_nat: np.ndarray) -> float:
    """The L-inf distance between the attack and the clean images, in float64."""
    return float(np.amax(np.abs(x_nat.astype(np.float64) - x_adv.astype(np.float64))))


def check_perturbation(x_adv: np.ndarray, x_nat: np.ndarray, epsilon: float) -> float:
    """Madry's epsilon check (in his words); returns the maximum perturbation."""
    l_inf = max_perturbation(x_adv, x_nat)
    if l_inf > epsilon + TOLERANCE:
        raise AttackFileError(f"maximum perturbation found: {l_inf}\n"
                              f"maximum perturbation allowed: {epsilon}")
    return l_inf


def validate(x_adv: np.ndarray, x_nat: np.ndarray, epsilon: float) -> float:
    """Every check run_attack.py makes on an array, for the clean images `x_nat` (uint8,
    the first num_eval_examples test images); returns the maximum perturbation."""
    check_array(x_adv, len(x_nat), x_nat.shape[1:])
    return check_perturbation(x_adv, x_nat, epsilon)
