"""The soak's verdict on fds and memory: judged on the trend after warm-up, so that a sample
taken while programs restart or dumps are in flight neither fails a run nor hides a leak."""

from __future__ import annotations

from tests.soak.soak import Sample, growth_after


def samples(fds: list[int], rss_kib: list[int]) -> list[Sample]:
    return [
        Sample(elapsed=5.0 * i, fds=f, rss_kib=r, threads=8, zombie_children=0)
        for i, (f, r) in enumerate(zip(fds, rss_kib, strict=True))
    ]


def test_a_count_that_moves_with_the_programs_but_does_not_grow_is_no_growth() -> None:
    # Its ends differ by 5 (a restart in flight at the start); its trend is flat.
    run = samples([226, 231, 229, 233, 228, 230, 229, 227, 226, 231], [58000] * 10)
    fds, rss = growth_after(run[0], run)
    assert abs(fds) <= 1
    assert rss == 0.0


def test_a_steady_leak_is_counted_whole() -> None:
    run = samples([200 + i for i in range(12)], [50000 + 500 * i for i in range(12)])
    fds, rss = growth_after(run[0], run)
    assert fds == 11
    assert rss == 5500 / 50000
