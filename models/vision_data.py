"""Images with no download: scikit-learn's bundled handwritten digits (1797 8x8 greyscale, 10
classes), or your own arrays saved with `numpy.savez(path, images=[N, H, W], labels=[N])`.

Images become sequences of patches (`[N, tokens, patch*patch]`), the input of a transformer.
"""

import dataclasses
import pathlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class ImageData:
    train_x: np.ndarray  # float32 [n, tokens, patch_dim]
    train_y: np.ndarray  # int32 [n]
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int

    def batch(self, seed: int, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """A training batch that is a function of (seed, step) (so resumed runs are exact)."""
        rng = np.random.default_rng([seed, step])
        index = rng.integers(0, len(self.train_y), size=batch_size)
        return self.train_x[index], self.train_y[index]


def patchify(images: np.ndarray, patch: int) -> np.ndarray:
    """`[N, H, W]` -> `[N, (H/p)*(W/p), p*p]`, row-major patches."""
    n, height, width = images.shape
    if height % patch or width % patch:
        raise ValueError(f"image size {height}x{width} is not a multiple of patch {patch}")
    x = images.reshape(n, height // patch, patch, width // patch, patch)
    return x.transpose(0, 1, 3, 2, 4).reshape(n, -1, patch * patch)


def load_images(
    path: str | pathlib.Path | None = None, *, patch: int = 2, test_fraction: float = 0.2
) -> ImageData:
    """Digits (default) or an .npz of images/labels; standardised, split by a fixed permutation."""
    if path is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images, labels = digits.images, digits.target
    else:
        with np.load(path) as data:
            images, labels = data["images"], data["labels"]
    images = np.asarray(images, np.float32)
    images = (images - images.mean()) / (images.std() + 1e-6)
    labels = np.asarray(labels, np.int32)
    order = np.random.default_rng(1234).permutation(len(labels))
    cut = int(len(labels) * (1 - test_fraction))
    x = patchify(images, patch)
    train, test = order[:cut], order[cut:]
    return ImageData(x[train], labels[train], x[test], labels[test], int(labels.max()) + 1)
