import pytest
import torch
import torch.nn.functional as F

from chatforge.model import GPT, GPTConfig
from chatforge.ppo import (
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
    equal the engine's own (sampled with the KV cache) and each row's alone; the reward model's score is
    read at each answer's last token."""
    from chatforge.engine import SamplingParams, generate_batch
    from chatforge.ppo import RolloutBatch, token_logprobs

    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=50, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=32)).eval()
    reward = GPT(GPTConfig(vocab_size=50, n_layer=1, d_model=32, n_head=4, max_seq_len=32, head="scalar")).eval()
    torch.nn.init.normal_(reward.score.weight)
    prompts = [[1, 5, 6, 7, 8, 9], [1, 11], [1, 12, 13, 14]]
    params = SamplingParams(max_new_tokens=7, temperature=1.0, seed=3)
    completions = [c[0] for c in generate_batch(policy, prompts, params, stop_ids=(2, 3, 4), logprobs=True)]
    answers = [c.tokens for c in completions]
    assert len({len(a) for a in answers}) > 1, answers  # ragged answers (this seed)
    batch = RolloutBatch.build(prompts, answers, pad_id=0)
    with torch.no_grad():
        answer_tokens = batch.ids[:, batch.prompt_width:]
        logprobs = token_logprobs(batch.answer_logits(policy), answer_tokens) * batch.mask
        scores = batch.answer_scores(reward)
        values = batch.answer_values(reward)
        for row, (p, a) in enumerate(zip(prompts, answers)):
            alone = token_logprobs(policy(torch.tensor([p + a]))[:, len(p) - 1 : -1], torch.tensor([a]))[0]
            torch.testing.assert_close(logprobs[row, : len(a)], alone, rtol=0, atol=1e-5)
            torch.testing.assert_close(logprobs[row, : len(a)], torch.tensor(completions[row].logprobs), rtol=0, atol=1e-4)
            assert (logprobs[row, len(a):] == 0).all() and (values[row, len(a):] == 0).all()
            full = reward(torch.tensor([p + a]))[0]
            torch.testing.assert_close(scores[row], full[-1], rtol=0, atol=1e-5)
            torch.testing.assert_close(values[row, : len(a)], full[len(p) - 1 : -1], rtol=0, atol=1e-5)


def test_experience_from_a_rollout():
    """Policy = reference: no KL, so each answer's only reward is its score on its last token; advantages
    and returns follow GAE; an answer cut off by the length limit pays the penalty."""
    from chatforge.engine import SamplingParams, generate_batch
    from chatforge.ppo import make_experience, model_reward

    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=50, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=32)).eval()
    critic = GPT(GPTConfig(vocab_size=50, n_layer=1, d_model=32, n_head=4, max_seq_len=32, head="scalar")).eval()
    torch.nn.init.normal_(critic.score.weight)
    prompts = [[1, 5, 6, 7], [1, 11], [1, 12, 13]]
    out = [c[0] for c in generate_batch(policy, prompts, SamplingParams(max_new_tokens=4, seed=1),
                                       stop_ids=tuple(range(2, 12)))]
    answers, finished = [c.tokens for c in out], [c.finish_reason == "stop" for c in out]
    assert not all(finished) and any(finished), finished  # both kinds (this seed)
    plain = make_experience(policy, policy, critic, model_reward(critic), prompts, answers, finished, pad_id=0, beta=0.1,
                            whiten_advantages=False)
    penalised = make_experience(policy, policy, critic, model_reward(critic), prompts, answers, finished, pad_id=0, beta=0.1,
                                unfinished_penalty=2.0, whiten_advantages=False)
    assert plain.kl.abs().max() == 0
    for row, answer in enumerate(answers):
        last = len(answer) - 1
        assert plain.rewards[row, last] == plain.scores[row]
        assert plain.rewards[row].abs().sum() == plain.scores[row].abs()  # nothing else
        expected = plain.scores[row] - (0 if finished[row] else 2.0)
        assert penalised.scores[row].item() == pytest.approx(expected.item())
    advantages, returns = generalized_advantages(plain.rewards, plain.values, plain.batch.mask, 1.0, 0.95)
    torch.testing.assert_close(plain.advantages, advantages)
    torch.testing.assert_close(plain.returns, returns)
    whitened = make_experience(policy, policy, critic, model_reward(critic), prompts, answers, finished, pad_id=0, beta=0.1)
    assert masked_mean(whitened.advantages, whitened.batch.mask).abs() < 1e-5
    clipped = make_experience(policy, policy, critic, model_reward(critic), prompts, answers, finished, pad_id=0, beta=0.1,
                              reward_clip=0.01)
    assert clipped.scores.abs().max() <= 0.01 + 1e-7


class CountingReward(torch.nn.Module):
    """A rule as the reward model: the score at a position is how often `token` occurs up to it."""

    def __init__(self, token: int):
        super().__init__()
        self.token = token

    def forward(self, ids, pad=None):
        return (ids == self.token).float().cumsum(-1)


def test_ppo_raises_a_rule_defined_reward_with_bounded_kl():
    """Rollouts, experience and PPO epochs in a loop: the policy learns to say token 7 more often than
    the frozen reference, which the KL term keeps in sight."""
    import copy

    from chatforge.engine import SamplingParams, generate_batch
    from chatforge.ppo import make_experience, model_reward, ppo_epochs

    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=50, n_layer=2, d_model=32, n_head=4, max_seq_len=32))
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    value_model = GPT(GPTConfig(vocab_size=50, n_layer=1, d_model=32, n_head=4, max_seq_len=32, head="scalar"))
    reward = CountingReward(7)
    optimizers = [torch.optim.AdamW(policy.parameters(), lr=3e-3), torch.optim.AdamW(value_model.parameters(), lr=3e-3)]
    prompts = [[1, 20 + i % 4] for i in range(16)]
    generator = torch.Generator().manual_seed(0)
    history = []
    for step in range(12):  # ~2 s
        policy.eval()
        out = [c[0] for c in generate_batch(policy, prompts, SamplingParams(max_new_tokens=8, seed=step))]
        experience = make_experience(policy, reference, value_model, model_reward(reward), prompts, [c.tokens for c in out],
                                     [True] * len(out), pad_id=0, beta=0.02)
        history.append((experience.scores.mean().item(), masked_mean(experience.kl, experience.batch.mask).item()))
        policy.train()
        stats = ppo_epochs(policy, value_model, experience, optimizers, epochs=2, minibatch_size=8, generator=generator)
        assert all(map(torch.isfinite, map(torch.tensor, stats.values())))
    first, last = history[0][0], sum(s for s, _ in history[-3:]) / 3
    assert first < 0.5 and last > first + 1.0, history
    assert all(abs(kl) < 2.0 for _, kl in history), history
