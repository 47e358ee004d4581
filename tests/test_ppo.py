import dataclasses
import json
import pytest
import torch
import torch.nn.functional as F

from chatforge.model import GPT, GPTConfig
from chatforge.objectives import (
    AdaptiveKLController, clipped_policy_loss, clipped_value_loss, entropy, generalized_advantages,
    kl_penalized_rewards, masked_mean, ppo_ptx_loss, whiten,
)


def test_gae_by_hand_with_a_ragged_answer():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 77.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second answer has two tokens
    advantages, returns = generalized_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: δ2 = 2 − 1.5 = 0.5; δ1 = 0.9·1.5 − 1 = 0.35, A1 = 0.35 + 0.72·0.5; δ0 = 1 + 0.9·1 − 0.5 = 1.4
    a1 = 0.35 + 0.72 * 0.5
    # row 1: the value after its last token is 0: δ1 = 0 − 1 = −1; A0 = 1.4 + 0.72·(−1)
    expected = torch.tensor([[1.4 + 0.72 * a1, a1, 0.5], [1.4 - 0.72, -1.0, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)


def test_whitening_over_the_mask_only():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    out = whiten(x, mask)
    assert masked_mean(out, mask).abs() < 1e-6
    assert masked_mean(out**2, mask) == pytest.approx(1.0, abs=1e-5)
    assert out[1, 1] == 0 and out[1, 2] == 0
    kept = whiten(x, mask, shift_mean=False)
    assert masked_mean(kept, mask) == pytest.approx(2.5)  # mean of 1, 2, 3, 4


@pytest.mark.parametrize("sign, loss, clipped", [(1.0, -0.9, 1 / 3), (-1.0, 1.1, 1 / 3)])
def test_clipped_objective_on_hand_made_ratios(sign, loss, clipped):
    ratios = torch.tensor([[0.5, 1.0, 1.5]])
    old = torch.zeros(1, 3)
    advantages = torch.full((1, 3), sign)
    # A = +1: min(ρA, clip(ρ)A) = 0.5, 1, 1.2 (1.5 clipped to 1.2) -> mean 0.9
    # A = −1: min(−0.5, −0.8) = −0.8 (0.5 clipped up to 0.8), −1, −1.5 -> mean −1.1
    value, fraction = clipped_policy_loss(ratios.log(), old, advantages, torch.ones(1, 3), clip=0.2)
    assert value.item() == pytest.approx(loss)
    assert fraction.item() == pytest.approx(clipped)


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.1]]), torch.tensor([[3.0, 0.0]])
    # token 0: (2 − 3)² = 1 vs (2 clipped to 1.2, − 3)² = 3.24 -> 3.24; token 1: 0² vs (0.1 − 0.1 − 0)² -> 0
    loss = clipped_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.0) / 2, abs=1e-6)


def test_kl_penalty_on_every_answer_token_and_the_score_on_the_last_only():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-0.1, -9.0, -9.0, -9.0], [-9.0] * 4])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -1.0], [-0.3, -1.0, -1.0, -1.0], [-1.0] * 4])
    scores = torch.tensor([10.0, 20.0, 30.0])
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref, mask, beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [0.2, 0, 0, 0], [0.0] * 4]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 10.0, 0.0], [-0.02 + 20.0, 0, 0, 0], [0.0] * 4]))


def test_policy_gradient_equals_reinforce_when_nothing_is_clipped():
    """β = 0, one epoch (ratio 1), no clipping: ∇L^CLIP = −∇ E_t[A_t · log π(y_t)] (signs and masks)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, d_model=32, n_head=4, max_seq_len=16))
    ids = torch.randint(0, 50, (3, 12))
    prompt = 5  # answer tokens are ids[:, 5:], predicted from positions 4..10
    mask = torch.tensor([[1.0] * 7, [1.0] * 4 + [0.0] * 3, [1.0] * 2 + [0.0] * 5])
    advantages = torch.randn(3, 7)

    def answer_logprobs():
        logits = model(ids)[:, prompt - 1 : -1]
        return torch.gather(F.log_softmax(logits, -1), 2, ids[:, prompt:, None]).squeeze(2)

    logprobs = answer_logprobs()
    loss, fraction = clipped_policy_loss(logprobs, logprobs.detach(), advantages, mask, clip=0.2)
    assert fraction.item() == 0
    ppo = torch.autograd.grad(loss, list(model.parameters()))
    reinforce = torch.autograd.grad(-masked_mean(advantages * answer_logprobs(), mask), list(model.parameters()))
    for a, b in zip(ppo, reinforce):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_ptx_term_adds_exactly_the_language_model_gradient():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, d_model=32, n_head=4, max_seq_len=16))
    params = list(model.parameters())
    text = torch.randint(0, 50, (2, 9))
    policy_term = model(text[:, :-1]).float().pow(2).mean()  # any stand-in for the PPO terms
    lm = model(text[:, :-1], targets=text[:, 1:])
    zero = torch.zeros(())
    with_ptx = torch.autograd.grad(ppo_ptx_loss(policy_term, zero, zero, lm, 0.5, 0.0, 27.8), params, retain_graph=True)
    without = torch.autograd.grad(ppo_ptx_loss(policy_term, zero, zero, None, 0.5, 0.0, 27.8), params, retain_graph=True)
    lm_grad = torch.autograd.grad(lm, params)
    for a, b, g in zip(with_ptx, without, lm_grad):
        torch.testing.assert_close(a - b, 27.8 * g, rtol=1e-4, atol=1e-6)


def test_entropy_of_uniform_and_certain_policies():
    mask = torch.ones(1, 2)
    uniform = torch.zeros(1, 2, 8)
    certain = torch.tensor([[[50.0] + [0.0] * 7] * 2])
    assert entropy(uniform, mask).item() == pytest.approx(torch.log(torch.tensor(8.0)).item())
    assert entropy(certain, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_controller_moves_beta_toward_the_target():
    controller = AdaptiveKLController(beta=0.1, target=6.0, horizon=10_000)
    assert controller.update(kl=12.0, samples=100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10_000))  # clipped +20%
    beta = controller.beta
    assert controller.update(kl=3.0, samples=100) == pytest.approx(beta * (1 - 0.2 * 100 / 10_000))
    assert controller.update(kl=6.0, samples=100) == pytest.approx(beta * (1 - 0.2 * 100 / 10_000))  # on target
    restored = AdaptiveKLController(1.0, 1.0, 1)
    restored.load_state_dict(controller.state_dict())
    assert restored.state_dict() == controller.state_dict()


def test_a_rollout_batch_reads_each_row_as_it_would_alone():
    """Ragged prompts (left-padded) and answers (right-padded) in one forward pass: the answers' log-probs
    equal the engine's own (sampled with the KV cache) and each row's alone, also in a micro-batch of some
    rows cut to their own widths; the reward model's score is read at the <|end|> closing each answer,
    appended to the one that was cut off."""
    from chatforge.engine import SamplingParams, generate_batch
    from chatforge.objectives import token_logprobs
    from chatforge.rollout import RolloutBatch, model_reward

    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=50, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=32)).eval()
    reward = GPT(GPTConfig(vocab_size=50, n_layer=1, d_model=32, n_head=4, max_seq_len=32, head="scalar")).eval()
    torch.nn.init.normal_(reward.score.weight)
    prompts = [[1, 5, 6, 7, 8, 9], [1, 11], [1, 12, 13, 14]]
    params = SamplingParams(max_new_tokens=7, temperature=1.0, seed=3)
    completions = [c[0] for c in generate_batch(policy, prompts, params, stop_ids=(2, 3, 4), logprobs=True)]
    answers = [c.tokens for c in completions]
    finished = [c.finish_reason == "stop" for c in completions]
    assert len({len(a) for a in answers}) > 1 and any(finished) and not all(finished), answers  # this seed
    batch = RolloutBatch.build(prompts, answers, pad_id=0)
    end = 2
    with torch.no_grad():
        logprobs = token_logprobs(batch.answer_logits(policy), batch.answer_tokens) * batch.mask
        scores = model_reward(reward, end_id=end, pad_id=0)(prompts, answers, finished)
        values = batch.answer_values(reward)
        shorter, short = batch.rows(slice(1, 3)), batch.rows(slice(0, 1))  # shorter prompts; the short answer
        assert shorter.prompt_width < batch.prompt_width and short.mask.shape[1] < batch.mask.shape[1]
        shuffled = torch.tensor([2, 0])  # as ppo_epochs draws its minibatches
        for rows, part in ((slice(1, 3), shorter), (slice(0, 1), short), (shuffled, batch.rows(shuffled))):
            part_logprobs = token_logprobs(part.answer_logits(policy), part.answer_tokens) * part.mask
            torch.testing.assert_close(part_logprobs, logprobs[rows, : part.mask.shape[1]], rtol=0, atol=1e-5)
        for row, (p, a) in enumerate(zip(prompts, answers)):
            alone = token_logprobs(policy(torch.tensor([p + a]))[:, len(p) - 1 : -1], torch.tensor([a]))[0]
            torch.testing.assert_close(logprobs[row, : len(a)], alone, rtol=0, atol=1e-5)
            torch.testing.assert_close(logprobs[row, : len(a)], torch.tensor(completions[row].logprobs), rtol=0, atol=1e-4)
            assert (logprobs[row, len(a):] == 0).all() and (values[row, len(a):] == 0).all()
            # closed by <|end|> unless it sampled one: the cut-off answer, and the one stopped by token 3 or 4
            read = p + a if finished[row] and a[-1] == end else p + a + [end]
            torch.testing.assert_close(scores[row], reward(torch.tensor([read]))[0, -1], rtol=0, atol=1e-5)
            full = reward(torch.tensor([p + a]))[0]
            torch.testing.assert_close(values[row, : len(a)], full[len(p) - 1 : -1], rtol=0, atol=1e-5)


class ConstantValue(torch.nn.Module):
    """A value model that says 0.5 before every token, so that GAE can be worked out by hand."""

    def forward(self, ids, pad=None, head_from=0):
        return torch.full((len(ids), ids.shape[1] - head_from), 0.5)


def test_experience_from_a_rollout():
    """Policy = reference: no KL, so each answer's only reward is its score on its last token; advantages
    and returns are GAE's, worked out by hand; an answer cut off by the length limit pays the penalty."""
    from chatforge.rollout import make_experience

    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=50, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=32)).eval()
    prompts = [[1, 5, 6, 7], [1, 11], [1, 12, 13]]
    answers, finished = [[20, 21, 2], [22], [23, 24, 25, 26]], [True, True, False]
    scores = {(20, 21, 2): 1.0, (22,): -1.0, (23, 24, 25, 26): 2.0}
    reward = lambda prompts, answers, finished: torch.tensor([scores[tuple(a)] for a in answers])  # noqa: E731

    def experience(**options):
        return make_experience(policy, policy, ConstantValue(), reward, prompts, answers, finished, pad_id=0,
                               beta=0.1, gamma=1.0, lam=0.95, micro_batch_size=2, **options)

    plain, penalised = experience(whiten_advantages=False), experience(whiten_advantages=False, unfinished_penalty=2.0)
    assert plain.kl.abs().max() == 0
    torch.testing.assert_close(plain.scores, torch.tensor([1.0, -1.0, 2.0]))
    torch.testing.assert_close(penalised.scores, torch.tensor([1.0, -1.0, 0.0]))  # the cut-off answer pays 2
    # V = 0.5 everywhere, reward s on the last token only: δ_last = s − 0.5, every other δ = 0.5 − 0.5 = 0,
    # so A_t = 0.95^(last − t) · (s − 0.5) and R_t = A_t + 0.5
    expected = torch.tensor([[0.95**2 * 0.5, 0.95 * 0.5, 0.5, 0.0],
                             [-1.5, 0.0, 0.0, 0.0],
                             [0.95**3 * 1.5, 0.95**2 * 1.5, 0.95 * 1.5, 1.5]])
    torch.testing.assert_close(plain.rewards, torch.tensor([[0, 0, 1.0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 2.0]]))
    torch.testing.assert_close(plain.advantages, expected)
    torch.testing.assert_close(plain.returns, (expected + 0.5) * plain.batch.mask)
    torch.testing.assert_close(penalised.advantages[2], torch.tensor([0.95**3, 0.95**2, 0.95, 1.0]) * -0.5)
    whitened = experience()
    assert masked_mean(whitened.advantages, whitened.batch.mask).abs() < 1e-5
    assert experience(reward_clip=0.01).scores.abs().max() <= 0.01 + 1e-7


def counting_reward(token: int):
    """A rule as the reward: how often `token` occurs in the answer."""
    return lambda prompts, answers, finished: torch.tensor([float(list(a).count(token)) for a in answers])


def test_ppo_raises_a_rule_defined_reward_with_bounded_kl():
    """Rollouts, experience and PPO epochs in a loop: the policy learns to say token 7 more often than
    the frozen reference, which the KL term keeps in sight."""
    import copy

    from chatforge.engine import SamplingParams, generate_batch
    from chatforge.ppo import ppo_epochs
    from chatforge.rollout import make_experience

    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=50, n_layer=2, d_model=32, n_head=4, max_seq_len=32))
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    value_model = GPT(GPTConfig(vocab_size=50, n_layer=1, d_model=32, n_head=4, max_seq_len=32, head="scalar"))
    reward = counting_reward(7)
    optimizers = [torch.optim.AdamW(policy.parameters(), lr=3e-3), torch.optim.AdamW(value_model.parameters(), lr=3e-3)]
    prompts = [[1, 20 + i % 4] for i in range(16)]
    generator = torch.Generator().manual_seed(0)
    history = []
    for step in range(12):  # ~2 s
        policy.eval()
        out = [c[0] for c in generate_batch(policy, prompts, SamplingParams(max_new_tokens=8, seed=step))]
        experience = make_experience(policy, reference, value_model, reward, prompts, [c.tokens for c in out],
                                     [True] * len(out), pad_id=0, beta=0.02)
        history.append((experience.scores.mean().item(), masked_mean(experience.kl, experience.batch.mask).item()))
        policy.train()
        stats = ppo_epochs(policy, value_model, experience, optimizers, epochs=2, minibatch_size=8, generator=generator)
        assert all(map(torch.isfinite, map(torch.tensor, stats.values())))
    first, last = history[0][0], sum(s for s, _ in history[-3:]) / 3
    assert first < 0.5 and last > first + 1.0, history
    assert all(abs(kl) < 2.0 for _, kl in history), history


def test_running_moments_and_explained_variance_by_hand():
    from chatforge.objectives import RunningMoments
    from chatforge.rollout import explained_variance

    stats = RunningMoments()
    stats.update(torch.tensor([1.0, 2.0, float("nan")]))  # a non-finite score is left out
    stats.update(torch.tensor([3.0, 4.0, 5.0]))
    assert stats.count == 5 and stats.mean == pytest.approx(3.0) and stats.std == pytest.approx(2**0.5)
    torch.testing.assert_close(stats.normalize(torch.tensor([3.0, 3.0 + 2**0.5])), torch.tensor([0.0, 1.0]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 2.0, 9.0], [3.0, 0.0, 0.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)
    # V = R − (0.5, −0.5, 0): Var[R − V] = 1/6 against Var[R] = 2/3
    values = returns - torch.tensor([[0.5, -0.5, 0.0], [0.0, 0.0, 0.0]])
    assert explained_variance(values, returns, mask) == pytest.approx(1 - (1 / 6) / (2 / 3))


# --- the stage, end to end: a reward model that likes 'please' -----------------------------------------

PLEASE_PROMPTS = ["Say something.", "Answer me.", "Talk.", "Tell me a thing.", "Speak.", "Give me words."]
HELD_OUT_PROMPTS = ["Say a thing.", "Talk to me.", "Words, please.", "Tell me something.", "Speak to me.",
                    "Answer this.", "Give words.", "Say words.", "Talk now.", "Tell me."]


@pytest.fixture(scope="module")
def please(pretrained, tmp_path_factory):
    """An SFT model that answers with a few words (now and then 'please'), a reward model trained from it
    on rankings where more 'please' is better, and prompt files."""
    import random

    from conftest import WORDS, keyword_rankings, run_cli, write_jsonl

    root = tmp_path_factory.mktemp("please")
    rng = random.Random(0)
    conversations = []
    for _ in range(240):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), "please")
        conversations.append({"prompt": rng.choice(PLEASE_PROMPTS), "completion": " ".join(words)})
    write_jsonl(root / "chat.jsonl", conversations)
    run_cli("sft", "--preset", "tiny", "--init", pretrained, "--data", root / "chat.jsonl", "--out", root / "sft",
            "--max-steps", 150, "--lr", 3e-3, "--warmup-steps", 10, "--eval-every", 150, "--checkpoint-every", 150,
            "--no-progress")
    write_jsonl(root / "rankings.jsonl", keyword_rankings(96, 3, seed=0))
    run_cli("reward", "train", "--preset", "tiny", "--init", root / "sft", "--data", root / "rankings.jsonl",
            "--val-fraction", 0, "--out", root / "rm", "--epochs", 6, "--no-progress")
    (root / "prompts.txt").write_text("\n".join(PLEASE_PROMPTS) + "\n")
    (root / "held_out.txt").write_text("\n".join(HELD_OUT_PROMPTS) + "\n")
    return root


def ppo_args(root, out, *extra):
    return ["ppo", "--preset", "tiny", "--policy", root / "sft", "--reward", root / "rm", "--prompts",
            root / "prompts.txt", "--val-prompts", root / "held_out.txt", "--out", out, "--no-progress", *extra]


def test_ppo_raises_the_reward_and_the_rewarded_word_on_held_out_prompts_with_bounded_kl(please, tmp_path):
    from chatforge.checkpoint import load_model
    from chatforge.train import read_metrics
    from conftest import run_cli

    out = tmp_path / "ppo"
    # β 0.2: on seeds 0-3 the largest KL of a step is 6-8 nats, under the bound of 10; at 0.03-0.1 some seeds
    # passed it, which way a seed goes turning on the kernels' fp32 rounding
    run_cli(*ppo_args(please, out, "--kl-coef", 0.2))
    metrics = read_metrics(out)
    assert not [m for m in metrics if m.get("alarms")], "no alarm in a healthy run"
    steps = [m for m in metrics if "kl_per_answer" in m]
    assert len(steps) == 20 and all(m["kl_per_answer"] < 10 for m in steps)
    for key in ("reward", "kl", "entropy", "clip_fraction", "approx_kl", "value_loss", "explained_variance",
                "answer_length", "reward_length_corr", "sample", "samples_per_s", "generate_s", "train_s"):
        assert key in steps[-1], key
    assert (out / "ppo.png").stat().st_size > 20_000
    policy, _, _ = load_model(out)
    assert policy.config.head == "lm"  # the run's checkpoints are plain language models

    result = run_cli("ppo", "eval", "--policy", out, "--reference", please / "sft", "--reward", please / "rm",
                     "--prompts", please / "held_out.txt", "--out", tmp_path / "eval", "--max-new-tokens", 16)
    report = json.loads((tmp_path / "eval" / "ppo_eval.json").read_text())
    answers = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    assert report["prompts"] == len(answers) == len(HELD_OUT_PROMPTS)
    assert report["policy"]["reward"] > report["reference"]["reward"] + 1.0, report
    assert report["win_rate"] >= 0.6 and 0 < report["kl_per_answer"] < 10, report
    said = {who: sum(a[who].count("please") for a in answers) for who in ("policy", "reference")}
    assert said["policy"] >= 2 * said["reference"] + 3, said
    assert "win rate of PPO over SFT" in result.stdout


def test_kill_and_resume_continues_exactly(please, data_dir, tmp_path):
    """SIGKILL mid-run, then --resume: the same metrics step for step as an uninterrupted run, with every
    stateful option on (ptx batches, adaptive β, running reward statistics)."""
    from chatforge.checkpoint import step_checkpoints
    from conftest import kill_when, metrics_without_timing, run_cli

    options = ["--ptx-data", data_dir, "--kl-target", 1, "--normalize-reward", "--max-steps", 8,
               "--checkpoint-every", 3, "--eval-every", 4]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_cli(*ppo_args(please, reference, *options))
    kill_when(*ppo_args(please, killed, *options), ready=lambda: step_checkpoints(killed))
    done = [step for step, _ in step_checkpoints(killed)]
    assert done and done[-1] < 8, f"killed after {done}: the run should have been cut mid-way"
    result = run_cli("ppo", "--resume", killed, "--no-progress")
    assert f"resuming at step {done[-1]}" in result.stdout

    expected, resumed = metrics_without_timing(reference), metrics_without_timing(killed)
    assert len(resumed) == len(expected) and resumed == expected
    assert any("ptx_loss" in m for m in expected) and len({m.get("beta") for m in expected if "beta" in m}) > 1


def ppo_config(root, out, **overrides):
    from chatforge import config as cfg
    from chatforge.ppo import PPOConfig

    return cfg.from_dict(PPOConfig, cfg.merge(cfg.load_preset("tiny", "ppo"), {
        "policy": str(root / "sft"), "reward": str(root / "rm"), "prompts": [str(root / "prompts.txt")],
        "val_prompts": [str(root / "held_out.txt")], "out": str(out), "progress": False, **overrides}))


def test_non_finite_rewards_skip_the_step_with_an_alarm(please, tmp_path, monkeypatch):
    import chatforge.ppo as ppo
    from chatforge.errors import UserError
    from chatforge.train import read_metrics

    policy, _, task = ppo.build_ppo(ppo_config(please, tmp_path / "unit"), torch.device("cpu"))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    task.reward = lambda prompts, answers, finished: torch.full((len(answers),), float("nan"))
    before = [p.clone() for m in (policy, task.value_model) for p in m.parameters()]
    record = task.iteration(policy, optimizer, step=0, lr=1e-3)
    assert record["skipped"] and "non-finite rewards" in record["alarms"][-1]
    after = [p for m in (policy, task.value_model) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "nothing applied"
    assert not optimizer.state and not task.value_optimizer.state

    # in a run: step 2's rewards are NaN (call 1: with nothing held out, no evaluation calls the reward); it
    # is logged as skipped with its alarm, and the run goes on
    load_reward = ppo.load_reward

    def poisoned(config, tokenizer, device):
        model, reward = load_reward(config, tokenizer, device)
        calls = iter(range(1000))

        def score(*rollout):
            scores = reward(*rollout)
            return scores * float("nan") if next(calls) == 1 else scores
        return model, score

    monkeypatch.setattr(ppo, "load_reward", poisoned)
    out = ppo.train_ppo(ppo_config(please, tmp_path / "run", max_steps=3, eval_every=100, checkpoint_every=100,
                                   val_prompts=[], val_fraction=0.0))
    steps = [m for m in read_metrics(out) if "reward" in m]
    assert [bool(m.get("skipped")) for m in steps] == [False, True, False]
    assert "non-finite" in steps[1]["alarms"][0]
    with pytest.raises(UserError, match="stopped by --strict: non-finite"):
        ppo.train_ppo(ppo_config(please, tmp_path / "strict", max_steps=3, strict=True, val_prompts=[], val_fraction=0.0))


def test_collapse_alarms():
    from chatforge.rollout import collapse_alarm

    assert collapse_alarm(["a b", "c", ""]) is None
    assert "all 3 are the same" in collapse_alarm(["yes", "yes", "yes"])
    assert "empty" in collapse_alarm(["", "", "", "", "", "", "", "", "", "x"])


def test_value_model_choices(please):
    """From the reward model: a trainable copy (offset dropped); from SFT: a zero head; 'reward-head': the
    reward model's own (frozen) body under a trainable head, sharing its tensors."""
    from chatforge.checkpoint import load_model
    from chatforge.ppo import frozen, value_model_from

    sft, _, _ = load_model(please / "sft")
    rm = frozen(load_model(please / "rm")[0])
    ids = torch.tensor([[1, 40, 41, 42]])
    copied = value_model_from("reward", sft, rm)
    assert copied.config.score_offset == 0 and all(p.requires_grad for p in copied.parameters())
    torch.testing.assert_close(copied(ids), rm(ids) + rm.config.score_offset)
    fresh = value_model_from("sft", sft, rm)
    assert fresh(ids).abs().max() == 0
    shared = value_model_from("reward-head", sft, rm)
    assert shared.layers[0].mlp is rm.layers[0].mlp and shared.embed_tokens is rm.embed_tokens
    trainable = [name for name, p in shared.named_parameters() if p.requires_grad]
    assert trainable == ["score.weight"]


def test_ppo_errors(please, tmp_path):
    from conftest import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("ppo", "--preset", "tiny", "--policy", please / "sft", check=False), "--reward", "--prompts")
    assert_one_line_error(run_cli(*ppo_args(please, tmp_path / "a")[:5], "--reward", please / "sft", "--prompts",
                                  please / "prompts.txt", "--out", tmp_path / "a", check=False), "not a reward model")
    long = tmp_path / "long.txt"
    long.write_text("Hi.\n" + "word " * 200 + "\n")
    assert_one_line_error(run_cli(*ppo_args(please, tmp_path / "b"), "--prompts", long, check=False),
                          f"{long}:2", "leaving less than max_new_tokens (16)")
    assert_one_line_error(run_cli(*ppo_args(please, tmp_path / "c"), "--value-init", "nope", check=False), "value_init")


def test_a_classifier_reward_reads_the_answer_text_as_the_classifier_was_trained(tokenizer_dir):
    from chatforge.chat_format import Message, render
    from chatforge.rollout import classifier_reward
    from chatforge.comparisons import text_ids
    from chatforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    classifier = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, d_model=32, n_head=4, max_seq_len=32,
                               head="classifier", num_labels=2, labels=["negative", "positive"])).eval()
    end = tokenizer.end_id
    prompts = [render([Message("user", q)], tokenizer, add_generation_prompt=True) for q in ("Hi.", "How are you today?")]
    texts = ["a good day", "bad"]
    got = classifier_reward(classifier, tokenizer, "positive", "logprob")(
        prompts, [[*tokenizer.encode(t), end] for t in texts], [True, True])
    with torch.no_grad():
        expected = [classifier(torch.tensor([text_ids(t, tokenizer)]))[0, -1].log_softmax(-1)[1] for t in texts]
    torch.testing.assert_close(got, torch.stack(expected))


def test_entropy_shares_the_log_partition_and_has_no_gradient_when_its_coefficient_is_0():
    from chatforge.objectives import policy_terms, token_logprobs

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11, requires_grad=True)
    tokens, mask = torch.randint(0, 11, (2, 3)), torch.ones(2, 3)
    logprobs, without = policy_terms(logits, tokens, mask, entropy_grad=False)
    _, with_grad = policy_terms(logits, tokens, mask, entropy_grad=True)
    expected = F.log_softmax(logits, -1).gather(2, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(logprobs, expected)
    torch.testing.assert_close(token_logprobs(logits, tokens), expected)
    p = F.softmax(logits, -1)
    torch.testing.assert_close(with_grad, -(p * p.log()).sum(-1).mean())
    assert logprobs.requires_grad and with_grad.requires_grad
    assert not without.requires_grad and without.item() == pytest.approx(with_grad.item())


def test_a_ppo_iterations_peak_memory_does_not_grow_with_the_rollout():
    """Scoring (policy, reference, value model) and the updates run in micro-batches: a rollout 8x the
    micro-batch holds at most 1.5x the memory of one micro-batch's rollout (only its token ids and
    per-token scalars grow). Scoring the whole rollout in one pass held 2.8x. The rollout is generated in
    chunks too (`rows`), but this model's KV cache is too small for the bound to see it:
    bench/ppo_memory.py measures that part on the cpu architecture."""
    from chatforge.ppo import ppo_epochs
    from chatforge.rollout import make_experience, rollout
    from chatforge.runtime import peak_memory

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=2048, n_layer=1, d_model=32, n_head=4, max_seq_len=64)
    policy, value_model = GPT(config), GPT(dataclasses.replace(config, head="scalar"))
    reference = GPT(config).eval().requires_grad_(False)
    optimizers = [torch.optim.SGD(policy.parameters(), lr=1e-3), torch.optim.SGD(value_model.parameters(), lr=1e-3)]
    reward = lambda prompts, answers, finished: torch.zeros(len(answers))  # noqa: E731

    def iteration(rows: int):
        prompts = [[1, 5 + i % 7, 9] for i in range(rows)]
        prompts, answers, finished = rollout(policy.eval(), prompts, 1, 40, stop_id=0, seed=rows, rows=8)
        experience = make_experience(policy, reference, value_model, reward, prompts, answers, finished,
                                     pad_id=0, beta=0.02, micro_batch_size=8)
        ppo_epochs(policy, value_model, experience, optimizers, epochs=1, minibatch_size=8)

    iteration(8)  # the optimizers' state, allocated once
    _, small = peak_memory(lambda: iteration(8), torch.device("cpu"))
    _, large = peak_memory(lambda: iteration(64), torch.device("cpu"))
    assert large <= 1.5 * small, (small, large)


def test_ppo_scores_sampled_answers_as_reward_score_does_from_the_candidates_file(please, tmp_path):
    """Answers sampled by the engine, finished and cut off: the reward model's score inside a PPO iteration
    equals what `chatforge reward score` gives for the same records read from `chatforge sample`'s file."""
    import chatforge.ppo as ppo
    import chatforge.rollout as rollout
    from chatforge.chat_format import prompt_messages, render
    from conftest import run_cli

    candidates, scored = tmp_path / "candidates.jsonl", tmp_path / "scored.jsonl"
    run_cli("sample", please / "sft", "--prompts", please / "prompts.txt", "-k", 4, "--max-new-tokens", 5,
            "--temperature", 1.0, "--seed", 0, "--out", candidates, "--no-progress")
    run_cli("reward", "score", please / "rm", "--input", candidates, "--out", scored)
    records = [json.loads(line) for line in scored.read_text().splitlines()]
    reasons = [r for record in records for r in record["finish_reasons"]]
    assert "stop" in reasons and "length" in reasons, reasons  # both kinds (this seed)

    policy, tokenizer, task = ppo.build_ppo(ppo_config(please, tmp_path / "unit"), torch.device("cpu"))
    prompts = [render(prompt_messages(r["prompt"]), tokenizer, add_generation_prompt=True)
               for r in records for _ in r["completions"]]
    answers = [ids for r in records for ids in r["completion_ids"]]
    experience = rollout.make_experience(policy, task.reference, task.value_model, task.reward, prompts, answers,
                                         [reason == "stop" for reason in reasons], tokenizer.pad_id, beta=0.02,
                                         micro_batch_size=3)
    expected = torch.tensor([score for r in records for score in r["rewards"]])
    torch.testing.assert_close(experience.raw_scores, expected, rtol=0, atol=1e-5)


def test_a_rollout_in_chunks_keeps_the_order_and_draws_each_chunk_afresh():
    from chatforge.rollout import rollout

    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=50, n_layer=1, d_model=32, n_head=4, max_seq_len=32)).eval()
    prompts = [[1, 5]] * 4 + [[1, 7]]
    rows, answers, finished = rollout(policy, prompts, 2, 6, stop_id=2, seed=3, rows=4)  # chunks of 2 prompts
    assert rows == [p for p in prompts for _ in range(2)] and len(answers) == len(finished) == 10
    assert answers[:4] != answers[4:8]  # the same prompts, another chunk: another seed, other answers
    assert rollout(policy, prompts, 2, 6, stop_id=2, seed=3, rows=4)[1] == answers  # seeded
    whole = rollout(policy, prompts, 2, 6, stop_id=2, seed=3)
    assert whole[0] == rows and len(whole[1]) == 10


def test_ppo_with_lora_keeps_one_copy_of_the_weights_and_its_reference_is_the_lora_sft_model(please, tmp_path):
    """TRL's pitfall (#495, #3196): when the SFT model is itself a LoRA run, "the adapters switched off" must be
    the SFT model, not its base. The SFT adapters are merged first (into OUT/base), the policy's new adapters
    stand on that, and the reference is the policy with them off: the same weights, SFT's log-probs."""
    pytest.importorskip("peft")
    import chatforge.ppo as ppo
    from chatforge.checkpoint import load_model
    from chatforge.lora import has_adapters
    from conftest import run_cli

    run_cli("sft", "--preset", "tiny", "--init", please / "sft", "--data", please / "chat.jsonl", "--val-fraction", 0,
            "--max-steps", 3, "--epochs", 0, "--lr", 1e-2, "--lora-r", 4, "--out", tmp_path / "lora-sft", "--no-progress")
    lora_sft, _, _ = load_model(tmp_path / "lora-sft")
    policy, _, task = ppo.build_ppo(ppo_config(please, tmp_path / "ppo", policy=str(tmp_path / "lora-sft"), lora_r=4),
                                    torch.device("cpu"))
    assert has_adapters(policy) and (tmp_path / "ppo" / "base" / "config.json").is_file()
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == {n for n in policy.state_dict() if "lora_" in n}
    x = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(task.reference(x), lora_sft.eval()(x), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in task.reference.parameters()) == 0  # it owns no weights: it is the policy's


def test_a_lora_ppo_run_resumes_exactly(please, tmp_path):
    pytest.importorskip("peft")
    import shutil

    import chatforge.ppo as ppo
    from chatforge.train import read_metrics

    whole = ppo.train_ppo(ppo_config(please, tmp_path / "whole", lora_r=4, max_steps=2, checkpoint_every=1,
                                     eval_every=100, val_prompts=[], val_fraction=0.0))
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step_000002")
    config, checkpoint = ppo.resolve_config(None, {}, str(cut))
    ppo.train_ppo(config, resume_from=checkpoint)
    key = lambda run: [(m["step"], m["reward"], m["policy_loss"]) for m in read_metrics(run) if "reward" in m]
    assert key(cut) == key(whole) and len(key(whole)) == 2


# --- under torchrun: 2 processes (gloo) ----------------------------------------------------------------

# the options of the distributed runs: every stateful term on, and rollout chunks of 8 answers, so that one
# process samples the very answers two do (each of 2 processes generates one chunk of the batch of 16)
DISTRIBUTED = ["--rollout-batch-size", 8, "--kl-target", 1, "--normalize-reward", "--eval-every", 3]
COMPARED = ("reward", "kl_per_answer", "score", "loss", "policy_loss", "value_loss", "ptx_loss", "entropy",
            "approx_kl", "clip_fraction", "grad_norm", "beta", "val_reward", "val_kl_per_answer")


def assert_same_runs(expected: list[dict], got: list[dict]) -> None:
    """Step by step the same rollouts and samples, and the same losses, rewards and KL to 1e-4: the sum of
    two processes' gradients is the one process's to rounding."""
    assert [m["step"] for m in got] == [m["step"] for m in expected]
    for e, g in zip(expected, got):
        assert e.get("sample") == g.get("sample") and e.get("samples") == g.get("samples"), (e, g)
        assert {k for k in COMPARED if k in e} == {k for k in COMPARED if k in g}
        for key in COMPARED:
            if key in e:
                assert g[key] == pytest.approx(e[key], rel=1e-4, abs=1e-5), (e["step"], key, e[key], g[key])


ONE_ROW_MINIBATCHES = ["--micro-batch-size", 1, "--ptx-batch-size", 1]


@pytest.mark.parametrize("extra", [[], ["--lora-r", 4], ONE_ROW_MINIBATCHES, ["--fsdp"],
                                   ["--fsdp", "--lora-r", 4, *ONE_ROW_MINIBATCHES],
                                   ["--fsdp", "--value-init", "reward-head"], ["--fsdp", "--compile"]],
                         ids=["full", "lora", "one-row-minibatches", "fsdp", "fsdp-lora-one-row-minibatches",
                              "fsdp-value-head-only", "fsdp-compiled"])
def test_ppo_on_two_processes_equals_one_process(please, data_dir, tmp_path, extra):
    """torchrun with 2 processes, each sampling and scoring half of every rollout and computing half of each
    minibatch, against 1 process at the same global batch: the same metrics over 3 iterations, and the
    same weights at the end (with LoRA: the same adapters). With one-row minibatches (and one pretraining
    window) one process has nothing to compute in every update, and still takes part in it. With --fsdp
    the policy and the value model are sharded (rollouts sample and score with gathered copies; FSDP sums
    the gradients), or the policy alone (a value model that is a head on the reward model's body); compiled,
    the sharded models' updates equal one compiled process's."""
    from chatforge.checkpoint import load_model, load_trainer_state, step_checkpoints
    from conftest import metrics_without_timing, run_cli, run_torchrun

    options = [*DISTRIBUTED, "--ptx-data", data_dir, "--max-steps", 3, *extra]
    run_cli(*ppo_args(please, tmp_path / "one", *options))
    result = run_torchrun(*ppo_args(please, tmp_path / "two", *options))
    assert "2 process(es)" in result.stdout and result.stdout.count("held-out prompts") == 1  # rank 0 speaks
    expected, got = metrics_without_timing(tmp_path / "one"), metrics_without_timing(tmp_path / "two")
    assert len(expected) == 5 and any("ptx_loss" in m for m in expected)  # 2 evaluations, 3 iterations
    assert_same_runs(expected, got)
    one, two = load_model(tmp_path / "one")[0], load_model(tmp_path / "two")[0]
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    values_one, values_two = (load_trainer_state(step_checkpoints(run)[-1][1])["task"]["value_model"]
                              for run in (tmp_path / "one", tmp_path / "two"))
    assert values_one.keys() == values_two.keys()
    for name, a in values_one.items():
        torch.testing.assert_close(values_two[name], a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("extra", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_a_two_process_ppo_run_killed_resumes_exactly_on_two_or_on_one_process(please, tmp_path, extra):
    """SIGKILL to every process of a 2-process run mid-way; resumed on 2 processes, and (a copy) on 1: both
    continue as the uninterrupted run (the state is the same on every process, and answers are seeded by
    chunk, not by process). With --fsdp the policy's AdamW state is resharded from the checkpoint's files."""
    import shutil

    from chatforge.checkpoint import step_checkpoints
    from conftest import kill_when, metrics_without_timing, run_cli, run_torchrun

    options = [*DISTRIBUTED, "--max-steps", 5, "--checkpoint-every", 2, *extra]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_torchrun(*ppo_args(please, reference, *options))
    kill_when(*ppo_args(please, killed, *options), processes=2, ready=lambda: step_checkpoints(killed))
    done = [step for step, _ in step_checkpoints(killed)]
    assert done and done[-1] < 5, f"killed after {done}: the run should have been cut mid-way"
    if "--fsdp" in extra:  # the sharded value model's AdamW state is in the sharded checkpoint, not in the task's
        from torch.distributed.checkpoint import FileSystemReader

        saved = FileSystemReader(step_checkpoints(killed)[-1][1] / "optimizer").read_metadata().state_dict_metadata
        assert any(key.startswith("value_optimizer.") for key in saved) and any(key.startswith("optimizer.") for key in saved)
    shutil.copytree(killed, tmp_path / "killed-one")
    result = run_torchrun("ppo", "--resume", killed, "--no-progress")
    assert f"resuming at step {done[-1]}" in result.stdout
    run_cli("ppo", "--resume", tmp_path / "killed-one", "--no-progress")
    expected = metrics_without_timing(reference)
    assert metrics_without_timing(killed) == expected
    assert_same_runs(expected, metrics_without_timing(tmp_path / "killed-one"))


def test_compiled_ppo_updates_equal_eager_ones(please, data_dir, tmp_path):
    """--compile: the minibatch updates' forward passes of the policy and the value model go through
    torch.compile (shapes change with every minibatch: compiled for dynamic lengths), with the eager run's
    numbers, the ptx term included. (Under torch 2.13 the compiled backward pass failed after a few lengths
    until `split_heads` made the rotated heads contiguous under compile.)"""
    from conftest import metrics_without_timing, run_cli

    options = ["--max-steps", 3, "--eval-every", 3, "--ptx-data", data_dir]
    run_cli(*ppo_args(please, tmp_path / "eager", *options))
    run_cli(*ppo_args(please, tmp_path / "compiled", *options, "--compile"))
    assert_same_runs(metrics_without_timing(tmp_path / "eager"), metrics_without_timing(tmp_path / "compiled"))


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-processes-fsdp"])
def test_under_bf16_the_first_update_computes_the_rollouts_log_probs(please, tmp_path, processes):
    """Under bf16 autocast (on CPU here; the same code runs on a GPU) the first update of an iteration sees
    ratios π/π_old of exactly 1: the policy's forward pass in the update computes the log-probs that scored
    the rollout. With --fsdp the update runs on the sharded policy, whose gathers must hand it the fp32
    weights the rollout's gathered copy held (bf16 gathers put the norms and the embedding in bf16)."""
    from chatforge.train import read_metrics
    from conftest import run_cli, run_torchrun

    # one minibatch, one epoch: the only update is the first, before any optimizer step
    options = ["--dtype", "bfloat16", "--micro-batch-size", 16, "--ppo-epochs", 1, "--max-steps", 2, "--eval-every", 100]
    if processes == 2:
        run_torchrun(*ppo_args(please, tmp_path / "run", *options, "--rollout-batch-size", 8, "--fsdp"))
    else:
        run_cli(*ppo_args(please, tmp_path / "run", *options))
    steps = [m for m in read_metrics(tmp_path / "run") if "approx_kl" in m]
    assert len(steps) == 2 and any(m["policy_loss"] != 0 for m in steps)
    for m in steps:
        assert m["clip_fraction"] == 0 and abs(m["approx_kl"]) < 1e-7, m
