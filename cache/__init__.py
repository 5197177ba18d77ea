"""The KV cache: block allocator with prefix caching, the KV tensor pool, paged attention."""
from kvserve.cache.block_pool import BlockPool, hash_block_tokens
from kvserve.cache.kv_cache_manager import KVCacheManager

__all__ = ["BlockPool", "KVCacheManager", "hash_block_tokens"]
