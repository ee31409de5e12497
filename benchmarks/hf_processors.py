"""How far transformers' default ("fast", torchvision) image processors are from their PIL backend, which
clip-triton serves and takes as the reference for --hf-model checkpoints (docs/runtimes.md).

    .venv/bin/python -m benchmarks.hf_processors

Prints the largest and mean |fast - PIL| in normalised pixel units, over parity's builtin images and
over smooth (photo-like) and noise images of odd sizes, for a CLIP (shortest edge + crop) and a SigLIP
(squash) processor.
"""

from __future__ import annotations

import io

import numpy as np

PROCESSORS = {
    "CLIP 224 (shortest edge, crop)": ("CLIPImageProcessor", {"size": {"shortest_edge": 224},
                                                              "crop_size": {"height": 224, "width": 224}}),
    "SigLIP 384 (squash)": ("SiglipImageProcessor", {"size": {"height": 384, "width": 384}}),
}


def _images() -> dict[str, list]:
    from PIL import Image

    from clip_triton.exporter.parity.samples import builtin_images

    rng = np.random.default_rng(0)
    smooth, noise = [], []
    for w, h in ((640, 480), (1003, 97), (301, 225), (1920, 1080)):
        coarse = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        smooth.append(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))
        noise.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    builtin = [Image.open(io.BytesIO(s.data)) for s in builtin_images(24)]
    return {"builtin (24)": builtin, "smooth (4)": smooth, "noise (4)": noise}


def main() -> None:
    import transformers

    images = _images()
    for name, (cls, kwargs) in PROCESSORS.items():
        fast, pil = getattr(transformers, cls)(**kwargs), getattr(transformers, cls + "Pil")(**kwargs)
        for label, group in images.items():
            diffs = [
                np.abs(np.asarray(fast(images=i, return_tensors="np")["pixel_values"][0])
                       - np.asarray(pil(images=i, return_tensors="np")["pixel_values"][0]))
                for i in group
            ]
            print(f"{name}, {label}: max {max(float(d.max()) for d in diffs):.3f}, "
                  f"mean {float(np.mean([d.mean() for d in diffs])):.5f}")


if __name__ == "__main__":
    main()
