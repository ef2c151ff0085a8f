"""Train the tabular example's model on scikit-learn's bundled iris data (no download) and save it as JSON.

JSON, not a pickle: loading it runs no code. Writes model/iris.json next to this file; deterministic.
Run by `make build`; skips when the file is there (--force retrains).
"""

import argparse
import json
from pathlib import Path

from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

OUT = Path(__file__).resolve().parent / "model" / "iris.json"
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    if OUT.exists() and not args.force:
        return 0
    data = load_iris()
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=0))
    pipeline.fit(data.data, data.target)
    scaler, model = pipeline[0], pipeline[1]
    document = {
        "features": FEATURES,
        "classes": [str(name) for name in data.target_names],
        "scaler": {"mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist()},
        "coef": model.coef_.tolist(),
        "intercept": model.intercept_.tolist(),
        "training_accuracy": round(float(pipeline.score(data.data, data.target)), 4),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {OUT} (training accuracy {document['training_accuracy']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
