"""Class-activation maps drawn over the image the model saw, as one picture with its labels.

The heat map is pytorch-grad-cam's own overlay (`show_cam_on_image`: OpenCV's jet colour map blended
with the photo); this module only lays the panels side by side and writes the labels in.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL_MIN = 192  # panels are drawn at least this wide, so a 32 px model's maps are still visible
CAPTION = 22  # px of the caption band above the panels and of the label band under each
INK, WRONG, RIGHT, PAPER = (29, 35, 43), (198, 40, 40), (27, 127, 59), (255, 255, 255)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def heat_overlay(crop: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """A uint8 HWC photo with a [0, 1] map over it, through pytorch-grad-cam's overlay."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(crop.astype(np.float32) / 255.0, cam, use_rgb=True, image_weight=0.55)


def cam_picture(crop: np.ndarray, maps: list[tuple[str, np.ndarray]], caption: str, wrong: bool) -> Image.Image:
    """The photo, then one overlay per (label, map), side by side; `caption` above (red for a mistake)
    and each panel's label under it."""
    side = max(PANEL_MIN, crop.shape[0])
    panels = [("photo", crop)] + [(label, heat_overlay(crop, cam)) for label, cam in maps]
    width, height = side * len(panels) + 4 * (len(panels) - 1), side + 2 * CAPTION
    picture = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(picture)
    font = _font(14)
    draw.text((4, 3), caption, fill=WRONG if wrong else RIGHT, font=font)
    for i, (label, pixels) in enumerate(panels):
        x = i * (side + 4)
        panel = Image.fromarray(pixels).resize((side, side), Image.Resampling.BILINEAR)
        picture.paste(panel, (x, CAPTION))
        draw.text((x + 4, CAPTION + side + 3), label, fill=INK, font=font)
    return picture
