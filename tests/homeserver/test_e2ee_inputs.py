"""The E2EE endpoints' body checks under hypothesis: any JSON value either passes with the
right shape or is refused with a `MatrixError` (never another exception)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from teia.errors import MatrixError
from teia.homeserver.e2ee import _key_map, check_device_keys, local_targets

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
USER, DEVICE = "@u:localhost", "DEV"


@given(json_values)
def test_device_keys_are_checked(value: Any) -> None:
    try:
        keys = check_device_keys(value, USER, DEVICE)
    except MatrixError as exc:
        status = exc.status
        assert status == 400
        return
    assert keys["user_id"] == USER
    assert keys["device_id"] == DEVICE


@given(
    st.fixed_dictionaries(
        {
            "user_id": st.sampled_from([USER, "@other:localhost"]),
            "device_id": st.sampled_from([DEVICE, "X"]),
            "algorithms": st.lists(st.text(max_size=8), max_size=3) | json_values,
            "keys": st.dictionaries(st.text(max_size=8), st.text(max_size=8)) | json_values,
            "signatures": st.dictionaries(st.text(max_size=4), json_values) | json_values,
        }
    )
)
def test_almost_right_device_keys(value: dict[str, Any]) -> None:
    try:
        check_device_keys(value, USER, DEVICE)
    except MatrixError:
        return
    assert value["user_id"] == USER and value["device_id"] == DEVICE  # noqa: PT018


@given(json_values)
def test_key_maps_are_checked(value: Any) -> None:
    try:
        keys = _key_map(value, "one_time_keys")
    except MatrixError:
        return
    for key_id in keys:
        algorithm, _, name = key_id.partition(":")
        assert algorithm
        assert name


@given(json_values)
def test_to_device_targets_are_checked(value: Any) -> None:
    try:
        out = local_targets(value, lambda user: user.endswith(":localhost"), limit=5)
    except MatrixError as exc:
        status = exc.status
        assert status in (400, 429)
        return
    for user, devices in out.items():
        assert user.endswith(":localhost")
        assert all(isinstance(content, dict) for content in devices.values())
