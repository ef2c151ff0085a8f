"""Score iris flowers: each CSV item's rows come back with a predicted species (outputs/<name>.scored.csv).

The model is plain JSON (model/iris.json, from train.py): a StandardScaler and a LogisticRegression are
rebuilt from their parameters, so loading it runs no code.
"""

import json
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


class IrisScorer:
    def setup(self, ctx):
        spec = json.loads((Path(ctx.package_dir) / "model" / "iris.json").read_text(encoding="utf-8"))
        self.features = spec["features"]
        self.classes = spec["classes"]
        scaler = StandardScaler()
        scaler.mean_ = np.array(spec["scaler"]["mean"])
        scaler.scale_ = np.array(spec["scaler"]["scale"])
        scaler.var_ = scaler.scale_**2
        scaler.n_features_in_ = len(self.features)
        model = LogisticRegression()
        model.coef_ = np.array(spec["coef"])
        model.intercept_ = np.array(spec["intercept"])
        model.classes_ = np.arange(len(self.classes))
        model.n_features_in_ = len(self.features)
        self.pipeline = make_pipeline(scaler, model)
        ctx.log.info(f"iris model loaded: {len(self.classes)} species")

    def process(self, items, ctx):
        for item in items:
            with ctx.item(item):
                frame = pd.read_csv(item.path)
                missing = [column for column in self.features if column not in frame.columns]
                if missing:
                    raise ValueError(f"missing column(s) {', '.join(missing)}; the CSV needs a header with "
                                     f"{', '.join(self.features)}")
                values = frame[self.features].apply(pd.to_numeric, errors="coerce")
                if values.isna().any().any():
                    row = int(values.isna().any(axis=1).to_numpy().argmax()) + 2  # +1 header, +1 from 1
                    raise ValueError(f"line {row} has an empty or non-numeric measurement")
                probs = self.pipeline.predict_proba(values.to_numpy(dtype=float))
                best = probs.argmax(axis=1)
                confidence = probs.max(axis=1)
                scored = frame.copy()
                scored["species"] = [self.classes[i] if c >= ctx.params["min_confidence"] else "uncertain"
                                     for i, c in zip(best, confidence, strict=True)]
                scored["confidence"] = confidence.round(4)
                if ctx.params["probabilities"]:
                    for index, name in enumerate(self.classes):
                        scored[f"prob_{name}"] = probs[:, index].round(4)
                output = f"{PurePosixPath(item.name).stem}.scored.csv"
                ctx.write_output(output, scored.to_csv(index=False).encode())
                counts = scored["species"].value_counts()
                yield item, {"rows": len(scored), "output": f"outputs/{output}",
                             **{f"n_{name}": int(counts.get(name, 0)) for name in [*self.classes, "uncertain"]}}
