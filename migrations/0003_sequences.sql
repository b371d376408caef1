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

-- conversations: one row per (owner, peer). last_out_seq / last_in_seq: the last saved seq from the
-- owner to the peer / from the peer to the owner (last_out_seq is also the floor the shard's seq
-- counters are restored from); delivered_seq / read_seq: the owner's positions in the peer's messages.
-- A row may exist for positions alone (last_msg_id 0) until a message is saved.
ALTER TABLE conversations
  MODIFY last_msg_id BIGINT UNSIGNED NOT NULL DEFAULT 0,
  ADD COLUMN last_out_seq  BIGINT UNSIGNED NOT NULL DEFAULT 0,
  ADD COLUMN last_in_seq   BIGINT UNSIGNED NOT NULL DEFAULT 0,
  ADD COLUMN delivered_seq BIGINT UNSIGNED NOT NULL DEFAULT 0,
  ADD COLUMN read_seq      BIGINT UNSIGNED NOT NULL DEFAULT 0,
  DROP KEY idx_chat_list,
  ADD KEY idx_recent (owner_id, last_msg_id);
UPDATE conversations c SET
  last_out_seq = (SELECT COALESCE(MAX(seq), 0) FROM messages WHERE from_user_id = c.owner_id AND to_user_id = c.peer_id),
  last_in_seq  = (SELECT COALESCE(MAX(seq), 0) FROM messages WHERE from_user_id = c.peer_id AND to_user_id = c.owner_id);

-- The one delivered cursor per user becomes a position per conversation: every message of the peer
-- at or below the old cursor's id counts as delivered.
UPDATE conversations c JOIN delivery_cursors d ON d.user_id = c.owner_id SET
  c.delivered_seq = (SELECT COALESCE(MAX(seq), 0) FROM messages
                     WHERE from_user_id = c.peer_id AND to_user_id = c.owner_id AND id <= d.delivered_msg_id);
DROP TABLE delivery_cursors;
