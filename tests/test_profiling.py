"""train.profile keys; the traces a profiled run writes are read in test_metrics_run."""

import pytest


@pytest.mark.parametrize("profile, message", [
    (dict(enabled=True, start_step=3, end_step=2), "train.profile.end_step: 2 is before train.profile.start_step=3"),
    (dict(enabled=True, start_step=50, end_step=60), "train.profile.start_step: 50 is beyond train.train_iters=10"),
    (dict(enabled=True, ranks=[2]), "train.profile.ranks: rank 2 does not exist (world size 2)"),
    (dict(enabled=True, ranks=[]), "train.profile.ranks: is empty"),
    (dict(enabled=True, stop=3), "train.profile.stop: unknown key"),
])
def test_bad_profile_keys_name_the_fix(profile, message):
    from cola_megatron.config import config_from_dict
    from cola_megatron.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        config_from_dict({"train": dict(train_iters=10, global_batch_size=8, profile=profile)}, world_size=2)
    assert str(err.value).startswith(message) and "Fix:" in str(err.value)
