-- path_claims.raised: whether the seq of a fail-open save (path 2) is in its shard's seq counters in
-- Redis. Each shard owner reads the baseline claims not raised yet, raises its counters to their
-- rows' seqs and marks them raised (shard-worker `fail_open_floors`): every fail-open save reaches
-- the counters once, whatever order the saves commit in. The key keeps that read an index lookup
-- that finds nothing outside Redis outages. One statement (no `IF NOT EXISTS`, which MySQL 8 lacks).
ALTER TABLE path_claims
  ADD COLUMN raised TINYINT UNSIGNED NOT NULL DEFAULT 0,
  ADD KEY unraised (path, raised);
