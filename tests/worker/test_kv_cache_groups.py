"""KV-cache groups as vLLM forms them: one group when every layer sees alike; else each kind of layer cut
into groups as large as the rarest kind, so that the i-th layer of every group can share one cache tensor."""

from llmserve.worker.kv_cache_groups import form_kv_cache_groups, one_group


def test_layers_that_all_see_alike_form_one_group():
    assert form_kv_cache_groups([None] * 3) == one_group(3, [None] * 3)
    groups = form_kv_cache_groups([8] * 4)
    assert (groups.windows, groups.layers, groups.group_size) == ([8], [[0, 1, 2, 3]], 4)


def test_alternating_layers_form_two_groups_of_half_the_layers():   # Gemma 2
    groups = form_kv_cache_groups([8, None, 8, None, 8, None])
    assert groups.windows == [8, None]
    assert groups.layers == [[0, 2, 4], [1, 3, 5]] and groups.group_size == 3


def test_five_local_to_one_global_forms_groups_of_the_rarer_kind():   # Gemma 3: 5 sliding : 1 full
    windows = ([16] * 5 + [None]) * 2
    groups = form_kv_cache_groups(windows)
    assert groups.group_size == 2
    assert groups.windows == [16] * 5 + [None]
    assert groups.layers == [[0, 1], [2, 3], [4, 6], [7, 8], [9, 10], [5, 11]]


def test_a_kinds_last_group_may_be_short():
    groups = form_kv_cache_groups([4, 4, 4, None, None])
    assert groups.windows == [4, 4, None] and groups.layers == [[0, 1], [2], [3, 4]] and groups.group_size == 2


def test_one_group_slides_only_if_every_layer_does():
    assert one_group(3, [4, 8, 8]).windows == [8]
    assert one_group(3, [4, None, 8]).windows == [None]
