-- path_claims: which path numbers a message that may have taken both (ARCHITECTURE "Fail-open").
-- A gateway that believed Redis away saves a message on the baseline path when its append fails;
-- if the append did reach Redis, the stream holds a copy too. Both paths claim the serverMsgId here
-- before they number it — the fail-open save in its INSERT's transaction (path 2), the shard owner
-- before it numbers an entry appended while its gateway believed Redis away (path 1) — and the
-- first claim wins: the owner gives the stream copy the saved row's seq, or the fail-open save
-- answers ACK(accepted) and leaves the message to the stream. Rows are only written around Redis
-- outages; `claimed_at` lets an operator prune old ones.
CREATE TABLE IF NOT EXISTS path_claims (
  id          BIGINT UNSIGNED NOT NULL PRIMARY KEY,
  path        TINYINT UNSIGNED NOT NULL,
  claimed_at  TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
) ENGINE=InnoDB;
