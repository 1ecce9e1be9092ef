"""The tests' MongoDB-wire server (FerretDB on SQLite) answers PyMongo's async API."""

from __future__ import annotations

import uuid

from pymongo import AsyncMongoClient

from tests.conftest import MongoServer


async def test_an_inserted_document_reads_back(mongo_server: MongoServer) -> None:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongo_server.url, serverSelectionTimeoutMS=2000)
    try:
        collection = client["waso_test"][f"docs_{uuid.uuid4().hex[:8]}"]
        inserted = await collection.insert_one({"tenant": "acme", "sessions": 3})
        found = await collection.find_one({"_id": inserted.inserted_id})
        assert found == {"_id": inserted.inserted_id, "tenant": "acme", "sessions": 3}
        assert await collection.count_documents({"tenant": "acme"}) == 1
    finally:
        await client.close()
