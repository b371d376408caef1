-- Per-direction sequences, per-conversation positions and the conversation list (SPEC §3.10–3.11).
-- messages.seq is the message's position in its from→to direction: 1, 2, 3, … (UNIQUE per direction,
-- which is also the index a sync pages through). Rows saved before this migration are numbered in
-- id order, which is each sender's order.
ALTER TABLE messages ADD COLUMN seq BIGINT UNSIGNED NOT NULL DEFAULT 0 AFTER to_user_id;
UPDATE messages m JOIN (
    SELECT id, ROW_NUMBER() OVER (PARTITION BY from_user_id, to_user_id ORDER BY id) AS n FROM messages
  ) numbered ON numbered.id = m.id
  SET m.seq = numbered.n;
ALTER TABLE messages ADD UNIQUE KEY uk_direction_seq (from_user_id, to_user_id, seq), DROP KEY idx_inbox;

-- conversations: one row per (owner, peer), written by saves. last_out_seq / last_in_seq: the last
-- saved seq from the owner to the peer / from the peer to the owner (last_out_seq is also the floor
-- the shard's seq counters are restored from).
-- A row may exist before its first message (a baseline save locks both directions' rows up front):
-- last_msg_id 0 until then.
ALTER TABLE conversations
  MODIFY last_msg_id BIGINT UNSIGNED NOT NULL DEFAULT 0,
  ADD COLUMN last_out_seq BIGINT UNSIGNED NOT NULL DEFAULT 0,
  ADD COLUMN last_in_seq  BIGINT UNSIGNED NOT NULL DEFAULT 0,
  DROP KEY idx_chat_list,
  ADD KEY idx_recent (owner_id, last_msg_id);
UPDATE conversations c SET
  last_out_seq = (SELECT COALESCE(MAX(seq), 0) FROM messages WHERE from_user_id = c.owner_id AND to_user_id = c.peer_id),
  last_in_seq  = (SELECT COALESCE(MAX(seq), 0) FROM messages WHERE from_user_id = c.peer_id AND to_user_id = c.owner_id);

-- positions: how far the owner has confirmed the peer's messages (delivered / read), written by the
-- gateways' coalesced flushes. A table of its own: a flush never waits on the row locks of saves.
CREATE TABLE IF NOT EXISTS positions (
  owner_id      BIGINT UNSIGNED NOT NULL,
  peer_id       BIGINT UNSIGNED NOT NULL,
  delivered_seq BIGINT UNSIGNED NOT NULL DEFAULT 0,
  read_seq      BIGINT UNSIGNED NOT NULL DEFAULT 0,
  updated_at    TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  PRIMARY KEY (owner_id, peer_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- The one delivered cursor per user becomes a position per conversation: every message of the peer
-- at or below the old cursor's id counts as delivered.
INSERT INTO positions (owner_id, peer_id, delivered_seq)
  SELECT c.owner_id, c.peer_id,
         (SELECT COALESCE(MAX(seq), 0) FROM messages
          WHERE from_user_id = c.peer_id AND to_user_id = c.owner_id AND id <= d.delivered_msg_id)
  FROM conversations c JOIN delivery_cursors d ON d.user_id = c.owner_id;
DROP TABLE delivery_cursors;
