"""Image files of any size and colour as MNIST-like 28x28 grey digits, for predict.py."""

import os
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from gradlab.errors import UserError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm")
SIZE = 28
# A 48-megapixel photo is 8000 x 6000; a header that claims more is refused before any pixel is decoded.
MAX_PIXELS = 8000 * 6000


def list_images(path: str) -> list[str]:
    """`path` itself, or the image files of the folder `path` (by extension, sorted)."""
    if os.path.isdir(path):
        try:
            names = os.listdir(path)
        except OSError as err:
            raise UserError(f"input={path}: cannot list the folder ({err.strerror}).") from None
        files = sorted(os.path.join(path, f) for f in names if f.lower().endswith(EXTENSIONS))
        if not files:
            raise UserError(f"input={path}: the folder holds no image files ({', '.join(EXTENSIONS)}).")
        return files
    if not os.path.isfile(path):
        raise UserError(f"input={path}: no such file or folder.")
    return [path]


def load_digit(path: str, invert: Union[bool, str] = "auto") -> torch.Tensor:
    """(28, 28) float pixels in [0, 1], light digit on a dark background as in MNIST.

    Transparency is flattened onto white (a drawing app's dark strokes on nothing); `invert="auto"` inverts
    images whose border is mostly light, i.e. dark ink on light paper. The image is then padded to a square
    and area-averaged down (or up) to 28x28, keeping its aspect ratio.
    """
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:  # before decoding: the header alone decides
                raise ValueError(f"it claims {image.width} x {image.height} pixels, more than the "
                                 f"{MAX_PIXELS:,} read here")
            image = ImageOps.exif_transpose(image)
            image.load()
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image file PIL can read. Give a PNG or JPEG image (any size), or a "
                        "folder of them.") from None
    except Exception as err:  # PIL's decoders raise OSError, ValueError, SyntaxError, EOFError, struct.error, ...
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise UserError(f"{path}: cannot be read as an image ({reason}). Give a PNG or JPEG image (any size), or "
                        "a folder of them.") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    grey = image.convert("L")
    pixels = np.asarray(grey, dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if invert is True or (invert == "auto" and border.mean() > 127):
        grey = ImageOps.invert(grey)
    # BOX = the mean of the source pixels under each target pixel: anti-aliased, and exact for integer factors.
    square = ImageOps.pad(grey, (SIZE, SIZE), method=Image.Resampling.BOX, color=0)
    return torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0)
