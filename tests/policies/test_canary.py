from sidecard.policies.canary import BUCKETS, bucket, in_canary


def test_raising_the_percentage_only_adds_users():
    users = [f"user-{i}" for i in range(2000)]
    at_10 = {u for u in users if in_canary("support-reply", u, 10)}
    at_25 = {u for u in users if in_canary("support-reply", u, 25)}
    assert at_10 < at_25 and 0.05 < len(at_10) / len(users) < 0.15


def test_prompt_names_sharing_sixteen_characters_get_different_slices():
    a, b = "support-reply-v2-emea", "support-reply-v2-apac"
    assert [bucket(a, f"user-{i}") for i in range(50)] != [bucket(b, f"user-{i}") for i in range(50)]
    assert all(0 <= bucket(a, f"user-{i}") < BUCKETS for i in range(50))
