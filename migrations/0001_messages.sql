-- Messages, conversations and delivery cursors. MySQL 8 / MariaDB 10.11.
-- id = serverMsgId (time-ordered, made by the gateway), so ORDER BY id is the order of acceptance.

CREATE TABLE IF NOT EXISTS messages (
  id            BIGINT UNSIGNED NOT NULL,
  from_user_id  BIGINT UNSIGNED NOT NULL,
  to_user_id    BIGINT UNSIGNED NOT NULL,
  -- The conversation as an ordered pair, so one index serves history in both directions.
  user_lo       BIGINT UNSIGNED GENERATED ALWAYS AS (LEAST(from_user_id, to_user_id)) STORED,
  user_hi       BIGINT UNSIGNED GENERATED ALWAYS AS (GREATEST(from_user_id, to_user_id)) STORED,
  client_msg_id VARCHAR(64) NOT NULL,
  msg_type      VARCHAR(16) NOT NULL,
  content       TEXT NOT NULL,
  status        TINYINT NOT NULL DEFAULT 1,
  created_at    TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  PRIMARY KEY (id),
  -- The durable dedupe backstop behind the Redis idempotency window.
  UNIQUE KEY uk_sender_client_msg (from_user_id, client_msg_id),
  -- History of a conversation, newest first.
  KEY idx_conversation (user_lo, user_hi, id),
  -- Offline resend: a user's inbox after their delivered cursor.
  KEY idx_inbox (to_user_id, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- A user's chat list: one row per (owner, peer), upserted once per saved batch, never per message.
CREATE TABLE IF NOT EXISTS conversations (
  owner_id    BIGINT UNSIGNED NOT NULL,
  peer_id     BIGINT UNSIGNED NOT NULL,
  last_msg_id BIGINT UNSIGNED NOT NULL,
  updated_at  TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  PRIMARY KEY (owner_id, peer_id),
  KEY idx_chat_list (owner_id, updated_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- How far each user has confirmed delivery (ACK delivered); offline resend starts after it.
CREATE TABLE IF NOT EXISTS delivery_cursors (
  user_id          BIGINT UNSIGNED NOT NULL,
  delivered_msg_id BIGINT UNSIGNED NOT NULL,
  updated_at       TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  PRIMARY KEY (user_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
