"""What a path beneath the served root holds now, kept fresh: request paths (`path`), safe
resolution (`root`), hidden names, listings, ETags, the cache and the directories it needs
watched (`cache`, `watchset`, `freshness`), writes (`write`); `served.ServedTree` puts them
together."""
