-- clientMsgId is compared byte for byte (SPEC §3.9). The utf8mb4_bin collation of 0001 is PAD SPACE:
-- "x" and "x " collided on uk_sender_client_msg, so a second message was folded into the first one's
-- key and never got a row. VARBINARY compares every byte and pads nothing, on MySQL 8, MariaDB and
-- TiDB alike; the bytes stored so far are kept as they are. The gateway caps clientMsgId at 64 bytes.
-- Tested on MariaDB; TiDB may refuse to change a column's charset in place (see docs/OPERATIONS.md).
-- Re-running this statement is harmless (the column already has this type).

ALTER TABLE messages MODIFY client_msg_id VARBINARY(64) NOT NULL;
