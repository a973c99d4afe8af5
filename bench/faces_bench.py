"""Face identity on a CPU: time per image of detection + embedding, and the separation it measures.

Real photos from scikit-image: the astronaut in varied shots (the same person) against the
cameraman (another person); prints per-image milliseconds at three sizes and the scores side by side.

    python bench/faces_bench.py
"""

from __future__ import annotations

import time

from PIL import Image, ImageEnhance, ImageOps
from skimage import data

from likeness.models.faces import load_face_models, reference_embeddings, score_identity


def main(repeats: int = 10) -> None:
    models = load_face_models()
    astronaut = Image.fromarray(data.astronaut())
    camera = Image.fromarray(data.camera()).convert("RGB")
    references = reference_embeddings(models, [astronaut, ImageOps.mirror(astronaut).crop((40, 0, 470, 430))])
    same = [astronaut.crop((80, 0, 380, 300)), ImageOps.mirror(astronaut), ImageEnhance.Brightness(astronaut).enhance(0.6),
            astronaut.rotate(8, resample=Image.Resampling.BICUBIC), astronaut.resize((200, 200)),
            astronaut.crop((110, 0, 330, 300)).resize((47, 64))]
    other = [camera, ImageOps.mirror(camera), camera.resize((256, 256))]
    s, o = score_identity(models, same, references).summary(), score_identity(models, other, references).summary()
    print(f"same person   mean {s['face_identity']:.3f}  min {s['face_identity_min']:.3f}  max {s['face_identity_max']:.3f}")
    print(f"other person  mean {o['face_identity']:.3f}  min {o['face_identity_min']:.3f}  max {o['face_identity_max']:.3f}")
    print(f"separation (same min - other max): {s['face_identity_min'] - o['face_identity_max']:.3f}")
    for side in (64, 512, 1024):
        image = astronaut.resize((side, side))
        start = time.perf_counter()
        for _ in range(repeats):
            score_identity(models, [image], references)
        print(f"{side:5d} px: {(time.perf_counter() - start) / repeats * 1000:6.1f} ms per image (detect + embed)")


if __name__ == "__main__":
    main()
