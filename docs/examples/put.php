<?php
// Put messages durably from PHP: one HTTP request on the put socket of the
// dropr-client daemon (plain php-cli: no extension needed).  dropr_put()
// returns once the message is on stable storage, and throws otherwise (then
// nothing may be assumed stored: retry with the same id, or give up).
//
//     php docs/examples/put.php /var/spool/dropr http://central:8080/

function dropr_new_id(): string
{
    // 32 hex digits: the time in milliseconds (12), then randomness (20).
    return sprintf('%012x', (int) (microtime(true) * 1000)) . bin2hex(random_bytes(10));
}

function dropr_put(
    string $payload,
    string $destination,
    string $channel = 'common',
    int $priority = 5,
    string $spool = '/var/spool/dropr',
    ?string $id = null
): string {
    $query = http_build_query([
        'destination' => $destination,
        'channel' => $channel,
        'priority' => $priority,
        'id' => $id ?? dropr_new_id(),
    ]);
    $socket = @stream_socket_client("unix://$spool/put.sock", $errno, $error, 5);
    if ($socket === false) {
        throw new RuntimeException(
            "cannot reach dropr-client at $spool/put.sock ($error): is it running on this spool?"
        );
    }
    stream_set_timeout($socket, 30);
    $request = "POST /?$query HTTP/1.1\r\nHost: spool\r\nConnection: close\r\n"
        . 'Content-Length: ' . strlen($payload) . "\r\n\r\n" . $payload;
    for ($sent = 0; $sent < strlen($request); $sent += $n) {
        $n = fwrite($socket, substr($request, $sent));
        if ($n === false || $n === 0) {
            fclose($socket);
            throw new RuntimeException('dropr-client closed the connection; retry with the same id');
        }
    }
    $answer = stream_get_contents($socket);
    fclose($socket);
    $parts = explode("\r\n\r\n", (string) $answer, 2);
    $status = (int) (explode(' ', $parts[0])[1] ?? 0);
    $body = json_decode($parts[1] ?? '', true);
    if ($status !== 200 || !isset($body['stored'][0])) {
        $reason = $body['error'] ?? 'no answer';
        throw new RuntimeException("dropr put refused ($status): $reason");
    }
    return $body['stored'][0];
}

$spool = $argv[1] ?? (getenv('DROPR_SPOOL') ?: '/var/spool/dropr');
$destination = $argv[2] ?? 'http://127.0.0.1:8080/';

echo 'put ', dropr_put(json_encode(['order' => 1]), $destination, 'orders', 3, $spool), "\n";

// Exactly once across retries: one id for every attempt at the same message.
$id = dropr_new_id();
for ($attempt = 1; $attempt <= 2; $attempt++) {
    echo 'put ', dropr_put(json_encode(['order' => 2]), $destination, 'orders', 5, $spool, $id), "\n";
}

try {
    dropr_put('x', $destination, 'no/slashes', 5, $spool);
} catch (RuntimeException $e) {
    echo 'refused: ', $e->getMessage(), "\n";
}
