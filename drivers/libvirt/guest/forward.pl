# forward.pl PORT: makes the host's 127.0.0.1:PORT appear on the guest's 127.0.0.1:PORT, for
# drover-libvirt's `forward_ports` in images without socat. With QEMU's user-mode networking the
# host's loopback is 10.0.2.2; each connection gets a process that copies both ways until both
# ends are done. Only modules of perl-base, which every Debian-family image has.
use strict;
use warnings;
use IO::Socket::INET;
use IO::Select;

my $port = shift or die "usage: forward.pl PORT\n";
my $listener = IO::Socket::INET->new(
    LocalAddr => "127.0.0.1", LocalPort => $port, Listen => 64, ReuseAddr => 1
) or die "cannot listen on 127.0.0.1:$port: $!\n";
$SIG{CHLD} = "IGNORE";
while (1) {
    my $client = $listener->accept or next;
    my $pid = fork;
    if (!defined $pid || $pid) { close $client; next; }
    close $listener;
    my $host = IO::Socket::INET->new(PeerAddr => "10.0.2.2", PeerPort => $port) or exit 1;
    my %peer = ($client => $host, $host => $client);
    my $open = IO::Select->new($client, $host);
    while ($open->count) {
        for my $from ($open->can_read) {
            my $to = $peer{$from};
            my $got = sysread($from, my $buffer, 65536);
            if (!$got) {
                # End of one direction: pass it on, keep copying the other.
                shutdown($to, 1);
                $open->remove($from);
                next;
            }
            my $at = 0;
            while ($at < $got) {
                my $wrote = syswrite($to, $buffer, $got - $at, $at);
                exit 0 unless defined $wrote;
                $at += $wrote;
            }
        }
    }
    exit 0;
}
