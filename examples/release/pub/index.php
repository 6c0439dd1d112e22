<?php
// Example release: answers with its release id, so a switch is visible.
$id = trim((string) @file_get_contents(__DIR__ . '/../RELEASE_ID'));
header('Content-Type: text/plain');
echo "release=" . ($id !== '' ? $id : 'unknown') . "\n";
