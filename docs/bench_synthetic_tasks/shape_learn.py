"""Can the vision tower learn a needle's shape from a direct signal? An experiment, not a training stage.

Trains the tower and its merger (from a model folder's weights) with a linear head on the mean of
the needle's merged tokens (4-way shape classification, one 2-frame slice of the benchmark's
112x112 scenes per example, a 32-48 px needle of a random colour), and prints the accuracy on 256
held-out slices every 50 steps. Nothing is saved.

    python docs/bench_synthetic_tasks/shape_learn.py MODEL_DIR MINUTES [LR]
"""
import sys, time, numpy as np, torch, torch.nn.functional as F
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
from adapttoken.training import synthetic as syn
from adapttoken.training.train_tiny import VisionTrainForward, _normalize_patchify
torch.set_num_threads(2); torch.manual_seed(0)
path = sys.argv[1]; minutes = float(sys.argv[2])
proc = AutoProcessor.from_pretrained(path, local_files_only=True)
model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32, local_files_only=True)
vision = VisionTrainForward(model)
head = torch.nn.Linear(vision.dim, 4)
params = list(model.model.visual.parameters()) + list(head.parameters())
opt = torch.optim.AdamW(params, lr=float(sys.argv[3]) if len(sys.argv) > 3 else 5e-4)
def batch(rng, n):
    frames, masks, ys = [], [], []
    for i in range(n):
        y = int(rng.integers(0, 4)); colour = list(syn.COLOURS)[rng.integers(0, 4)]
        nd = syn._needle_at(rng, (0, 2), colour, syn.SHAPES[y], syn.DEFAULT_SIZE, (32, 48))
        frames.append(syn.make_frames(2, int(rng.integers(0, 10**6)), syn.DEFAULT_SIZE, [nd]))
        m = np.zeros(16, np.float32); m[[r * 4 + c for r, c in nd.tokens()]] = 1; masks.append(m / m.sum()); ys.append(y)
    x = torch.from_numpy(np.concatenate(frames)).permute(0, 3, 1, 2).float()
    return _normalize_patchify(x, proc), torch.tensor(np.array(masks)), torch.tensor(ys)
def logits(pv, m, n):
    f = vision(pv, n).reshape(n, 16, -1)
    return head(F.layer_norm((m[:, :, None] * f).sum(1), f.shape[-1:]))
test = batch(np.random.default_rng(123), 256)
rng = np.random.default_rng(1); t0 = time.time(); step = 0
while time.time() - t0 < 60 * minutes:
    pv, m, y = batch(rng, 32)
    loss = F.cross_entropy(logits(pv, m, 32), y)
    opt.zero_grad(); loss.backward(); opt.step(); step += 1
    if step % 50 == 0:
        with torch.no_grad():
            acc = (logits(test[0], test[1], 256).argmax(-1) == test[2]).float().mean().item()
        print(f"step {step} {time.time()-t0:.0f}s loss {loss.item():.3f} held-out acc {acc:.3f}", flush=True)
