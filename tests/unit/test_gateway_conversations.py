"""The conversation store on a real Redis: items in order, each tenant its own, bounded."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from services import keys
from services.gateway import conversations
from services.gateway.conversations import REDIS_TIMEOUT_S, ConversationStore, conversation_id
from services.gateway.errors import ApiError
from services.localinfra import RedisServer, free_port

USER = {"type": "message", "role": "user", "content": "hello"}


@pytest.fixture
def store(redis_client) -> ConversationStore:
    return ConversationStore(redis_client, ttl_s=60)


async def test_items_keep_their_order_and_get_ids_of_the_servers_own(store, redis_client) -> None:
    made = await store.create("acme", [USER, {**USER, "id": "msg_given", "content": "two"}], {"k": "v"})
    conv = made["id"]
    assert made["object"] == "conversation" and made["metadata"] == {"k": "v"}
    assert await store.get(conv, "acme") == made
    added = await store.append(conv, "acme", [{"type": "function_call_output", "call_id": "c", "output": "4"}])
    output = {"id": "msg_answer", "type": "message", "role": "assistant", "status": "completed",
              "content": [{"type": "output_text", "text": "hi"}]}
    await store.append(conv, "acme", [output], new_ids=False)
    items = await store.items(conv, "acme")
    assert [i.get("content", i.get("output")) for i in items] == ["hello", "two", "4", output["content"]]
    assert items[1]["id"] != "msg_given" and items[1]["id"].startswith("msg_")
    assert added[0]["id"].startswith("fco_") and items[3]["id"] == "msg_answer"
    assert await store.item(conv, "acme", items[2]["id"]) == items[2]
    assert (await store.delete_item(conv, "acme", items[0]["id"]))["id"] == conv
    assert [i["id"] for i in await store.items(conv, "acme")] == [i["id"] for i in items[1:]]
    with pytest.raises(ApiError) as gone:
        await store.delete_item(conv, "acme", items[0]["id"])
    assert gone.value.status == 404 and gone.value.param == "item_id"
    updated = await store.update(conv, "acme", {"k": "w"})
    assert updated["metadata"] == {"k": "w"} and updated["created_at"] == made["created_at"]
    assert 0 < await redis_client.ttl(keys.conversation_order(conv)) <= 60
    await store.delete(conv, "acme")
    assert not await redis_client.exists(*(f(conv) for f in (
        keys.conversation, keys.conversation_items, keys.conversation_order)))
    with pytest.raises(ApiError) as deleted:
        await store.get(conv, "acme")
    assert deleted.value.status == 404


async def test_another_tenants_conversation_reads_as_not_found(store) -> None:
    conv = (await store.create("acme", [USER], None))["id"]
    for call in (store.get(conv, "globex"), store.items(conv, "globex"), store.delete(conv, "globex"),
                 store.append(conv, "globex", [USER]), store.update(conv, "globex", {})):
        with pytest.raises(ApiError) as err:
            await call
        assert err.value.status == 404 and err.value.param == "conversation_id"
    assert len(await store.items(conv, "acme")) == 1  # untouched


async def test_a_conversation_holds_a_bounded_number_of_items(store, monkeypatch) -> None:
    monkeypatch.setattr(conversations, "MAX_ITEMS", 3)
    conv = (await store.create("acme", [USER, USER], None))["id"]
    with pytest.raises(ApiError) as err:
        await store.append(conv, "acme", [USER, USER])
    assert err.value.status == 400 and err.value.code == "conversation_full"
    assert len(await store.append(conv, "acme", [USER])) == 1
    assert len(await store.items(conv, "acme")) == 3


async def test_an_answer_is_added_as_its_input_then_its_output_unless_it_failed(store) -> None:
    conv = (await store.create("acme", [], None))["id"]
    output = [{"id": "msg_a", "type": "message", "role": "assistant", "content": []}]
    await store.add_turn(conv, "acme", [USER], {"id": "resp_1", "status": "failed", "output": output})
    assert await store.items(conv, "acme") == []
    await store.add_turn(conv, "acme", [USER], {"id": "resp_2", "status": "incomplete", "output": output})
    assert [i["id"][:4] for i in await store.items(conv, "acme")] == ["msg_", "msg_"]
    await store.delete(conv, "acme")
    # Deleted while an answer ran: the answer went out; nothing comes back to life.
    await store.add_turn(conv, "acme", [USER], {"id": "resp_3", "status": "completed", "output": output})
    with pytest.raises(ApiError):
        await store.items(conv, "acme")


async def test_without_a_ttl_no_conversation_is_kept(redis_client) -> None:
    with pytest.raises(ApiError) as err:
        await ConversationStore(redis_client, ttl_s=0).create("acme", [], None)
    assert err.value.status == 400 and err.value.code == "unsupported"


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("conv_1", "conv_1"), ({"id": "conv_2"}, "conv_2")])
def test_a_responses_request_names_its_conversation_by_id_or_object(value, expected) -> None:
    assert conversation_id(value) == expected


@pytest.mark.parametrize("value", ["", 7, {"name": "x"}, {"id": 3}, ["conv_1"]])
def test_a_bad_conversation_reference_is_a_400_naming_it(value) -> None:
    with pytest.raises(ApiError) as err:
        conversation_id(value)
    assert err.value.status == 400 and err.value.param == "conversation"


async def test_an_unreachable_redis_is_a_503_to_retry() -> None:
    down = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        for call in (ConversationStore(down, 60).create("acme", [USER], None),
                     ConversationStore(down, 60).items("conv_1", "acme")):
            with pytest.raises(ApiError) as err:
                await call
            assert err.value.status == 503
    finally:
        await down.aclose()


async def test_an_append_tried_again_adds_each_item_once(store) -> None:
    conv = (await store.create("acme", [], None))["id"]
    turn = [{**USER, "id": "msg_1"}, {"id": "msg_2", "type": "message", "role": "assistant", "content": "hi"}]
    await store.append(conv, "acme", turn, new_ids=False)
    await store.append(conv, "acme", turn, new_ids=False)  # its first try landed after all
    assert [i["id"] for i in await store.items(conv, "acme")] == ["msg_1", "msg_2"]


async def test_a_turn_redis_could_not_take_is_appended_once_it_is_back(tmp_path) -> None:
    """The answer goes out while Redis is down; its turn lands when Redis is back."""
    server = RedisServer(workdir=tmp_path / "redis")
    server.start()
    client = aioredis.from_url(server.url)
    try:
        store = ConversationStore(client, ttl_s=60)
        conv = (await store.create("acme", [USER], None))["id"]
        await asyncio.sleep(1.2)  # in the append-only file (fsync every second)
        server.kill()
        output = [{"id": "msg_out", "type": "message", "role": "assistant", "content": "hi"}]
        async with asyncio.timeout(REDIS_TIMEOUT_S + 1):  # not held back until Redis is back
            await store.add_turn(conv, "acme", [USER], {"id": "resp_1", "status": "completed",
                                                         "output": output})
        server.start()

        async def landed() -> list[dict]:
            while len(items := await store.items(conv, "acme")) < 3:
                await asyncio.sleep(0.2)
            return items

        async with asyncio.timeout(20):
            items = await landed()
        await asyncio.sleep(1.0)
        assert [i["id"] for i in await store.items(conv, "acme")] == [i["id"] for i in items]
        assert len(items) == 3 and items[2]["id"] == "msg_out"
    finally:
        await client.aclose()
        server.stop()
