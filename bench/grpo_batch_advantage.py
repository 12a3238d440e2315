"""What drives the reference GRPO update in batch-advantage mode? A first-order decomposition.

    python bench/grpo_batch_advantage.py [--sft-steps 15 40 80] [--sigmas 1.5 0.5]
        [--rollouts 8] [--from-run RUN_DIR] [--out bench/results/grpo_batch_advantage_cpu.json]

Batch mode (paper Sec. 3.2.2, Eq. 7): A_pk = (s_pk - m) / Z with m = mean of the CLEAN rewards
s_p0 of the batch and Z the L2 norm of all (s - m). With s_p = mean of prompt p's G rewards,
split every advantage into

* the prompt's constant  A_const = (s_p - m) / Z  (the same for all G rows of prompt p; its
  mean over the batch is mean(s) - m < 0 when noisy rows score below the clean rows), and
* the centered part      A_cent  = (s_pk - s_p) / Z (zero mean within each prompt: what group
  advantages keep, up to the per-group scale, and what the sigma^2 * H * grad argument covers).

The loss L = -(1/R) sum A_pk l_pk (l = token-mean target log-prob given the row's latent,
gradient through r) is linear in A, so its gradient splits exactly: g = g_const + g_cent
(checked against the trainer's own gradient). For several rollouts of 16 prompts x G 8 at
SFT weights -- a tiny 1-layer x 64 Qwen2 on a 120-item/200-user synthetic catalogue after
``--sft-steps`` SFT steps (bench/grpo_estimators.py's setting), and with ``--from-run`` the
"SFT only" model of an embedded-default CLI run -- it prints

* the mean advantage and the share of negative advantages;
* ||g_const|| / ||g||, ||g_cent|| / ||g|| and cos(g, g_const);
* per prompt, whether its clean log-likelihood moves along -g_const with the sign of s_p - m
  (easier than the batch mean -> up, harder -> down);
* the first-order change per unit step along -g of the batch's mean clean log-likelihood and
  of the held-out mean clean reward, split into the two terms' contributions, and the same
  for the group-advantage update and for AdamW's first step (sign of the gradient).

Results go to ``--out`` (JSON); the README's "GRPO: what the reference estimator does" quotes
them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from grpo_estimators import sft_model  # noqa: E402

from latentr3_fast.data import collate  # noqa: E402
from latentr3_fast.ops import grpo_advantage, perplexity_reward  # noqa: E402
from latentr3_fast.train.grpo import GRPOConfig, GRPOTrainer  # noqa: E402

G = 8
PROMPTS = 16


def flat_grad(out: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(out, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )


def heldout_reward_grad(model, valid, pad_id: int, params) -> tuple[float, torch.Tensor]:
    """Mean clean-latent reward on the held-out rows and its gradient w.r.t. LatentRATT."""
    batch = collate(valid, pad_id)
    with torch.no_grad():
        hidden, cache = model.encode_prompt(batch.prompt_ids, batch.prompt_mask)
    r = model.latents(hidden, batch.prompt_mask, cache)
    h = model.suffix_forward(cache, batch.prompt_mask, r.to(model.dtype), batch.target_ids)
    logp = model.target_logprobs(h, batch.target_ids, batch.target_mask).float()
    reward = perplexity_reward(logp, batch.target_mask).mean()
    return float(reward.detach()), flat_grad(reward, params)


def analyse_rollout(tr: GRPOTrainer, ri: int, val_grad: torch.Tensor) -> dict[str, float]:
    """Decompose one rollout's batch-mode gradient (see the module docstring)."""
    params = tr.params
    tr._train_mode()
    micro, rewards, adv = tr.collect(ri)
    assert len(micro) == 1, "one micro-batch per step keeps the graph in one piece"
    ms = micro[0]
    mask = ms.loss_mask.float()
    ell = (ms.logp_graph.float() * mask).sum(-1) / mask.sum(-1)  # [R] with grad
    s = rewards.view(-1, G).double()
    clean, group_mean = s[:, 0], s.mean(1)
    m = clean.mean()
    z = float(torch.linalg.vector_norm(s - m)) + 1e-6
    a_const = ((group_mean - m) / z)[:, None].expand_as(s).reshape(-1)
    a_cent = ((s - group_mean[:, None]) / z).reshape(-1)
    torch.testing.assert_close(a_const + a_cent, adv.double(), atol=1e-6, rtol=1e-5)  # = ops
    rows = float(ell.numel())

    def grad_of(a: torch.Tensor) -> torch.Tensor:  # gradient of -(1/R) sum a * l
        return flat_grad(-(a.float().detach() * ell).sum() / rows, params)

    g_const, g_cent = grad_of(a_const), grad_of(a_cent)
    g = g_const + g_cent
    # the split is exact: g is the trainer's own gradient of this rollout
    tr.compute_gradients(ri)
    g_trainer = torch.cat([q.grad.reshape(-1) for q in params])
    torch.testing.assert_close(g, g_trainer, rtol=1e-4, atol=1e-8)
    a_grp = grpo_advantage(rewards.float(), G, mode="group").double()
    g_grp = grad_of(a_grp)
    # d(mean clean log-lik of the batch's prompts) / d(theta)
    clean_ell = ell.view(-1, G)[:, 0]
    j_grad = flat_grad(clean_ell.mean(), params)
    # per prompt: does its clean log-lik move along -g_const with the sign of s_p - m?
    agree, up = 0, 0
    offsets = (group_mean - m).tolist()
    for p, off in enumerate(offsets):
        d = float(flat_grad(clean_ell[p], params) @ (-g_const))
        agree += int((d > 0) == (off > 0))
        up += int(d > 0)
    n = lambda v: float(torch.linalg.vector_norm(v))  # noqa: E731
    gn = n(g)

    def rate(direction: torch.Tensor, target: torch.Tensor, norm: float) -> float:
        # first-order change of a quantity along the update -direction, per unit of ``norm``
        return float(target @ (-direction)) / max(norm, 1e-30)

    return {
        "adv_mean": float(adv.double().mean()),
        "adv_frac_negative": float((adv < 0).double().mean()),
        "noisy_minus_clean_mean": float((s[:, 1:] - clean[:, None]).mean()),
        "prompts_below_clean_mean": float((group_mean < m).double().mean()),
        "const_norm_ratio": n(g_const) / gn,
        "cent_norm_ratio": n(g_cent) / gn,
        "cos_g_const": float(g @ g_const) / (gn * n(g_const)),
        "const_sign_agreement": agree / len(offsets),
        "const_frac_prompts_up": up / len(offsets),
        # per unit step along -g, split into the two terms' contributions (they add up)
        "batch_loglik_rate_g": rate(g, j_grad, gn),
        "batch_loglik_rate_const": rate(g_const, j_grad, gn),
        "batch_loglik_rate_cent": rate(g_cent, j_grad, gn),
        "batch_loglik_rate_group": rate(g_grp, j_grad, n(g_grp)),
        "heldout_rate_g": rate(g, val_grad, gn),
        "heldout_rate_const": rate(g_const, val_grad, gn),
        "heldout_rate_cent": rate(g_cent, val_grad, gn),
        "heldout_rate_group": rate(g_grp, val_grad, n(g_grp)),
        # AdamW's first step moves every coordinate by lr * sign(g)
        "heldout_rate_adam1_g": rate(torch.sign(g), val_grad, n(torch.sign(g))),
        "heldout_rate_adam1_group": rate(torch.sign(g_grp), val_grad, n(torch.sign(g_grp))),
        "heldout_steepest_ascent": n(val_grad),
    }


def run_sft_model(run_dir: Path):
    """The "SFT only" model of a finished ``python -m latentr3_fast.train`` run on the
    embedded default (its data is regenerated from the run's config.yaml)."""
    import yaml

    from latentr3_fast.data import PromptBuilder, make_synthetic
    from latentr3_fast.model import LatentReasoner

    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg = {str(k).replace("-", "_"): v for k, v in raw.items()}
    if cfg["data"] != "synthetic" or cfg["model"] is not None:
        raise SystemExit(f"{run_dir}: not an embedded-default run")
    ds = make_synthetic(
        num_items=cfg["synthetic_items"], num_users=cfg["synthetic_users"], seed=cfg["seed"]
    )
    model = LatentReasoner.from_pretrained(run_dir / "sft" / "model", device="cpu")
    pb = PromptBuilder(
        model.tokenizer,
        ds.category,
        template=cfg["template"],
        num_latent=model.num_latent,
        max_length=cfg["max_length"],
    )
    train, valid = pb.encode_many(ds.train), pb.encode_many(ds.valid)
    pad = model.tokenizer.pad_token_id
    return model, train, valid, pad if pad is not None else model.tokenizer.eos_token_id


def analyse_start(args, setting: str, sft_steps: int | None) -> list[dict]:
    """One starting model (tiny after ``sft_steps`` SFT steps, or the run's SFT model): one
    record per sigma, each summarising ``--rollouts`` rollouts (mean, min, max)."""
    if sft_steps is None:
        model, train, valid, pad_id = run_sft_model(args.from_run)
    else:
        model, train, valid, pad_id = sft_model(sft_steps)
    records = []
    for sigma in args.sigmas:
        cfg = GRPOConfig(
            num_generations=G,
            sigma=sigma,
            advantage="batch",
            prompts_per_step=PROMPTS,
            micro_batch_prompts=PROMPTS,
            epochs=100,
            progress=False,
            seed=0,
        )
        tr = GRPOTrainer(model, cfg, train)
        base, val_grad = heldout_reward_grad(model, valid[: args.valid_rows], pad_id, tr.params)
        runs = [analyse_rollout(tr, ri, val_grad) for ri in range(args.rollouts)]
        summary = {
            k: {
                "mean": statistics.fmean(r[k] for r in runs),
                "min": min(r[k] for r in runs),
                "max": max(r[k] for r in runs),
            }
            for k in runs[0]
        }
        records.append({"setting": setting, "sft_steps": sft_steps, "sigma": sigma,
                        "heldout_reward": base, "rollouts": args.rollouts, **summary})  # fmt: skip
        what = f"SFT {sft_steps} steps" if sft_steps is not None else f"{args.from_run} SFT"
        print_summary(f"{setting}, {what} (held-out reward {base:.3f}), sigma {sigma}", summary)
    return records


def print_summary(title: str, summary: dict) -> None:
    f = {k: v["mean"] for k, v in summary.items()}
    print(
        f"{title}: mean A "
        f"{f['adv_mean']:+.3f} ({100 * f['adv_frac_negative']:.0f} % < 0; noisy - clean "
        f"{f['noisy_minus_clean_mean']:+.3g}; {100 * f['prompts_below_clean_mean']:.0f} % "
        f"of prompts below m), |g_const|/|g| {f['const_norm_ratio']:.2f}, |g_cent|/|g| "
        f"{f['cent_norm_ratio']:.2f}, cos(g, g_const) {f['cos_g_const']:.2f}; -g_const "
        f"moves a prompt's clean log-lik with the sign of its offset for "
        f"{100 * f['const_sign_agreement']:.0f} % of prompts (up for "
        f"{100 * f['const_frac_prompts_up']:.0f} %)",
        flush=True,
    )
    print(
        f"    per unit step along -g: batch clean log-lik {f['batch_loglik_rate_g']:+.3g} "
        f"= const {f['batch_loglik_rate_const']:+.3g} + centered "
        f"{f['batch_loglik_rate_cent']:+.3g} (group {f['batch_loglik_rate_group']:+.3g}); "
        f"held-out reward {f['heldout_rate_g']:+.3g} = const "
        f"{f['heldout_rate_const']:+.3g} + centered {f['heldout_rate_cent']:+.3g} (group "
        f"{f['heldout_rate_group']:+.3g}; first AdamW step: batch "
        f"{f['heldout_rate_adam1_g']:+.3g}, group {f['heldout_rate_adam1_group']:+.3g}; "
        f"steepest ascent {f['heldout_steepest_ascent']:+.3g})",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sft-steps", type=int, nargs="*", default=[15, 40, 80])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[1.5, 0.5])
    ap.add_argument("--rollouts", type=int, default=8)
    ap.add_argument("--valid-rows", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--from-run",
        type=Path,
        help="also analyse the SFT model of an embedded-default CLI run in this directory",
    )
    ap.add_argument("--out", default="bench/results/grpo_batch_advantage_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    starts: list[tuple[str, int | None]] = [("tiny", n) for n in args.sft_steps]
    if args.from_run is not None:
        starts.append(("embedded default", None))

    def analyse_all() -> list[dict]:
        return [rec for start in starts for rec in analyse_start(args, *start)]

    timing = harness.time_call(analyse_all, reps=1, warmup=0)
    seconds = round(timing.min_s, 1)
    command = "python bench/grpo_batch_advantage.py " + " ".join(argv or sys.argv[1:])
    harness.write_results(args.out, "grpo_batch_advantage", timing.result, config=vars(args),
                          command=command, seconds=seconds)  # fmt: skip
    print(f"({seconds} s) -> {args.out}")


if __name__ == "__main__":
    main()
