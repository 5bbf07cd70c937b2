"""The DROP DATABASE statements labkeeper sends for the copies it made."""

from labkeeper import pg_drop


def test_drop_sql_quotes_the_name_and_adds_force_only_when_asked():
    assert (pg_drop.drop_sql('we"ird', force=True)
            == 'DROP DATABASE IF EXISTS "we""ird" WITH (FORCE);')
    assert pg_drop.drop_sql("plain", force=False) == 'DROP DATABASE IF EXISTS "plain";'
