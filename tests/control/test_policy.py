"""Sequence log-densities of the Gaussian policy against torch.distributions."""

import numpy as np
import torch

from amalab.control.dataset import Pair, Segment
from amalab.control.policy import GaussianMLP, collate_segment_pairs, segment_pair_logps


def _reference(policy, observations, actions):
    normal = torch.distributions.Normal(policy(observations), torch.exp(policy.log_std))
    return torch.distributions.Independent(normal, 1).log_prob(actions).sum(-1)


def test_sequence_log_density_matches_torch_distributions():
    torch.manual_seed(0)
    policy = GaussianMLP(21, 6, [16, 16], init_log_std=-0.3)
    with torch.no_grad():
        policy.log_std.copy_(torch.linspace(-1.0, 0.5, 6))
    observations, actions = torch.randn(4, 9, 21), 2 * torch.randn(4, 9, 6)
    torch.testing.assert_close(policy.sequence_log_density(observations, actions),
                               _reference(policy, observations, actions))


def test_pair_logps_are_each_segments_log_density_over_the_actions_it_took():
    """Segments that ended early (length < L: the episode terminated) count only their first ``length``
    actions, whatever the padding after them holds."""
    torch.manual_seed(1)
    policy = GaussianMLP(5, 2, [8])
    rng = np.random.default_rng(0)
    lengths = [3, 1, 2, 3, 3, 2]
    segments = [Segment(rng.normal(size=(3, 5)), rng.normal(size=(3, 2)), n) for n in lengths]
    pairs = [Pair(f"p{i}", 0, segments[2 * i], segments[2 * i + 1]) for i in range(3)]
    batch = collate_segment_pairs(pairs)
    logps = segment_pair_logps(policy, batch)
    assert batch.chosen_token_counts.tolist() == lengths[0::2]
    assert batch.rejected_token_counts.tolist() == lengths[1::2]
    for i, pair in enumerate(pairs):
        for got, segment in ((logps.chosen[i], pair.chosen), (logps.rejected[i], pair.rejected)):
            obs, act = (torch.as_tensor(x[:segment.length], dtype=torch.float32)
                        for x in (segment.observations, segment.actions))
            torch.testing.assert_close(got, _reference(policy, obs, act))
