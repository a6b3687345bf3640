"""Out-of-distribution flags on a slide unlike the training patients, beside a held-out patient's slide.

Trains ``--method`` with its reliability on every prepared sample except those of ``--held-out`` (a patient's
samples, e.g. her2st's B4), then predicts (a) that held-out sample at its own spots and (b) an image of
another stain and tissue (scikit-image's immunohistochemistry image: DAB and haematoxylin, mirrored into a
2,048 px square at the model's µm/px), and prints the fraction of spots flagged out of distribution in each.

    python benchmarks/reliability_ood.py --work-dir W --held-out B4 --method knn [--train C2,C3,C4,C5,C6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import tifffile
from PIL import Image
from skimage import data

from he2st.data.workspace import Workspace
from he2st.methods import load_method
from he2st.workflows.config import TrainRunConfig
from he2st.workflows.predict_slide import predict_slide
from he2st.workflows.train import train_model


def other_stain_slide(folder: Path, side: int = 2048) -> Path:
    """The IHC image mirrored into a ``side`` px square, and a mask covering all of it."""
    tile = data.immunohistochemistry()
    reps = -(-side // tile.shape[0])
    row = np.concatenate([tile if i % 2 == 0 else tile[:, ::-1] for i in range(reps)], axis=1)
    image = np.concatenate([row if i % 2 == 0 else row[::-1] for i in range(reps)], axis=0)[:side, :side]
    tifffile.imwrite(folder / "ihc.tif", np.ascontiguousarray(image))
    Image.fromarray(np.full((256, 256), 255, np.uint8)).save(folder / "all.png")
    return folder / "ihc.tif"


def flagged(path: Path) -> str:
    obs = ad.read_h5ad(path).obs
    score = np.percentile(obs["ood_score"], [10, 50, 90]).round(2)
    return f"{1.0 - float(obs['in_distribution'].mean()):.1%} (OOD score 10/50/90th percentiles {score.tolist()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--held-out", required=True, help="a sample whose patient is left out of training")
    parser.add_argument("--method", default="knn")
    parser.add_argument("--train", help="comma-separated training samples (default: every sample of another patient)")
    args = parser.parse_args()
    ws = Workspace(args.work_dir)
    patient = ws.load_sample(args.held_out).patient_id
    train = args.train.split(",") if args.train else [
        s for s in ws.sample_ids() if ws.load_sample(s).patient_id != patient]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        train_model(TrainRunConfig(work_dir=args.work_dir, method=args.method, train_samples=train,
                                   out=tmp / "model.pt", reliability=True))
        method = load_method(tmp / "model.pt")
        mpp = method.card.patch.pixel_size_um
        held = predict_slide(tmp / "model.pt", None, tmp / "held", spots_from=args.work_dir / "samples" /
                             f"{args.held_out}.h5ad")
        other = predict_slide(tmp / "model.pt", other_stain_slide(tmp), tmp / "other", mpp=mpp, mask=tmp / "all.png")
        print(f"{args.method} trained on {', '.join(train)} ({time.perf_counter() - start:.0f} s with both predictions)")
        print(f"held-out sample {args.held_out} (patient {patient}): {flagged(held)} of spots out of distribution")
        print(f"IHC image, another stain and tissue: {flagged(other)} of spots out of distribution")


if __name__ == "__main__":
    main()
