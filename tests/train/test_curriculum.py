"""Early-exit curricula and weights, against the paper's formulas and worked example."""
import pytest

from train.config import ExitConfig
from train.layerskip.curriculum import ExitCurriculum


def test_paper_weights_worked_example():
    cur = ExitCurriculum(ExitConfig(layers=[0, 8, 16, 24], curriculum="fixed", e_scale=0.2), 32, 100)
    w = cur.weights(0)
    assert list(w) == [0, 8, 16, 24, 31]
    assert [round(v, 4) for v in w.values()] == [0.0, 0.0330, 0.1245, 0.2747, 0.5678]
    assert sum(w.values()) == pytest.approx(1.0)  # exit 0 has weight 0 under the paper's e(l)


def test_uniform_and_linear_weights():
    u = ExitCurriculum(ExitConfig(layers=[1, 3], curriculum="fixed", weighting="uniform"), 6, 10).weights(0)
    assert u == pytest.approx({1: 1 / 3, 3: 1 / 3, 5: 1 / 3})
    lin = ExitCurriculum(ExitConfig(layers=[1, 3], curriculum="fixed", weighting="linear"), 6, 10).weights(0)
    assert lin == pytest.approx({1: 2 / 12, 3: 4 / 12, 5: 6 / 12})


def test_rotational_curriculum_step_by_step():
    cur = ExitCurriculum(ExitConfig(layers="0::2", curriculum="rotational", period=4), 8, 100)
    # (l - t) mod 4 == 0 among {0, 2, 4, 6}; the last layer (7) is always on.
    expected = {0: [0, 4, 7], 1: [7], 2: [2, 6, 7], 3: [7], 4: [0, 4, 7], 6: [2, 6, 7], 9: [7]}
    assert {t: cur.active(t) for t in expected} == expected
    assert cur.capture(2) == [2, 6]
    every = ExitCurriculum(ExitConfig(layers="0:", curriculum="rotational", period=3), 8, 100)
    assert [every.active(t) for t in range(3)] == [[0, 3, 6, 7], [1, 4, 7], [2, 5, 7]]


def test_gradual_curriculum_switches_on_from_the_top_and_is_full_by_half():
    cur = ExitCurriculum(ExitConfig(layers="0:", curriculum="gradual"), 4, 16)
    # l switches on at t >= (3 - l) * 16 / 8 = 2 (3 - l): layer 2 at 2, layer 1 at 4, layer 0 at 6.
    assert [cur.active(t) for t in range(7)] == [
        [3], [3], [2, 3], [2, 3], [1, 2, 3], [1, 2, 3], [0, 1, 2, 3]]
    big = ExitCurriculum(ExitConfig(layers="0:", curriculum="gradual"), 32, 1000)
    assert big.active(500) == list(range(32))
    assert 0 not in big.active(484) and 0 in big.active(485)  # 31 * 1000 / 64 = 484.4


def test_fixed_curriculum_uses_every_listed_exit():
    cur = ExitCurriculum(ExitConfig(layers=[5, 1, 7], curriculum="fixed"), 8, 10)
    assert all(cur.active(t) == [1, 5, 7] for t in range(10))


def test_resume_continues_exactly_and_reports_changed_settings():
    cfg = ExitConfig(layers="0:", curriculum="rotational", period=3)
    straight = ExitCurriculum(cfg, 8, 20)
    reference = [straight.advance() for _ in range(10)]

    first = ExitCurriculum(cfg, 8, 20)
    got = [first.advance() for _ in range(4)]
    state = first.state_dict()
    resumed = ExitCurriculum(cfg, 8, 20)
    resumed.load_state_dict(state)
    got += [resumed.advance() for _ in range(6)]
    assert got == reference

    changed = ExitCurriculum(ExitConfig(layers="0:", curriculum="rotational", period=4), 8, 20)
    with pytest.raises(ValueError, match="period"):
        changed.load_state_dict(state)
    with pytest.warns(UserWarning, match="period"):
        changed.load_state_dict(state, strict=False)
    assert changed.position == 4
