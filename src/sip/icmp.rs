//! ICMP errors for UDP sends (Linux `IP_RECVERR`): which destination turned out unreachable.
//!
//! Without `IP_RECVERR` Linux drops ICMP errors meant for an unconnected UDP socket, and a
//! proxy learns that a PBX is gone only when a timer runs out. With it, each error is queued on
//! the socket together with the destination of the datagram that caused it, so the transaction
//! sending there can fail at once (RFC 3261 §18.4, §17.1.4).

use std::io;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt,
};
use tokio::net::UdpSocket;

/// At most this many queued errors are read per call: a flood of ICMP cannot hold the loop.
const MAX_PER_DRAIN: usize = 64;

/// Has the kernel queue ICMP errors for `sock`'s sends.
pub fn enable(sock: &UdpSocket) -> io::Result<()> {
    let v4 = sock.local_addr()?.is_ipv4();
    let set = if v4 {
        setsockopt(sock, sockopt::Ipv4RecvErr, &true)
    } else {
        setsockopt(sock, sockopt::Ipv6RecvErr, &true)
    };
    set.map_err(io::Error::from)
}

/// Reads the queued errors of `sock` and returns the destinations an ICMP error was received
/// for (port or host unreachable, and the like), oldest first. Never blocks.
pub fn drain(sock: &UdpSocket) -> Vec<SocketAddr> {
    let fd = sock.as_raw_fd();
    let mut out = Vec::new();
    let mut data = [0u8; 512];
    let mut cmsg = nix::cmsg_space!(nix::libc::sock_extended_err, nix::libc::sockaddr_in6);
    for _ in 0..MAX_PER_DRAIN {
        let mut iov = [IoSliceMut::new(&mut data)];
        let msg = match recvmsg::<SockaddrStorage>(
            fd,
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(msg) => msg,
            Err(Errno::EINTR) => continue,
            Err(_) => break, // EAGAIN: the queue is empty
        };
        // The datagram's original destination comes as the message's address.
        let Some(dest) = msg.address.as_ref().and_then(socket_addr) else {
            continue;
        };
        let unreachable = msg.cmsgs().is_ok_and(|mut cmsgs| {
            cmsgs.any(|c| match c {
                ControlMessageOwned::Ipv4RecvErr(e, offender) => {
                    e.ee_origin == nix::libc::SO_EE_ORIGIN_ICMP
                        && means_unreachable(
                            e.ee_errno,
                            dest,
                            offender.map(|o| {
                                std::net::IpAddr::from(std::net::Ipv4Addr::from(u32::from_be(
                                    o.sin_addr.s_addr,
                                )))
                            }),
                        )
                }
                ControlMessageOwned::Ipv6RecvErr(e, offender) => {
                    e.ee_origin == nix::libc::SO_EE_ORIGIN_ICMP6
                        && means_unreachable(
                            e.ee_errno,
                            dest,
                            offender.map(|o| {
                                std::net::IpAddr::from(std::net::Ipv6Addr::from(
                                    o.sin6_addr.s6_addr,
                                ))
                            }),
                        )
                }
                _ => false,
            })
        });
        if unreachable {
            out.push(dest);
        }
    }
    out
}

/// Whether an ICMP error means the destination cannot be reached: port, host or network
/// unreachable. Others (fragmentation needed for path MTU discovery, time exceeded, parameter
/// problem) say nothing about the target, and a retransmission may well get through. A port
/// unreachable must come from the destination itself: one from anywhere else is forged.
fn means_unreachable(errno: u32, dest: SocketAddr, offender: Option<std::net::IpAddr>) -> bool {
    let errno = i32::try_from(errno).unwrap_or(0);
    match errno {
        nix::libc::ECONNREFUSED => {
            offender.is_none_or(|o| o.to_canonical() == dest.ip().to_canonical())
        }
        nix::libc::EHOSTUNREACH | nix::libc::ENETUNREACH => true,
        _ => false,
    }
}

/// Whether a send failed only because an earlier datagram's ICMP error was pending on the
/// socket (with `IP_RECVERR`, the next send to any address reports it): drain and retry.
pub fn is_pending_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::ECONNREFUSED | nix::libc::EHOSTUNREACH | nix::libc::ENETUNREACH)
    )
}

pub(crate) fn socket_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    let v6 = s.as_sockaddr_in6()?;
    Some(SocketAddr::from((v6.ip(), v6.port())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A datagram to a closed port on loopback comes back as an ICMP port unreachable, which
    /// names that destination.
    #[tokio::test]
    async fn a_closed_port_is_reported_with_its_address() {
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dest = closed.local_addr().unwrap();
        drop(closed);
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        enable(&sock).unwrap();
        sock.send_to(b"OPTIONS", dest).await.unwrap();
        // The error makes the socket readable; receiving reports it.
        let mut buf = [0u8; 64];
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), sock.recv_from(&mut buf))
            .await
            .expect("the ICMP error wakes the socket");
        assert!(got.is_err(), "{got:?}");
        assert_eq!(drain(&sock), vec![dest]);
        assert_eq!(drain(&sock), vec![], "the queue is empty after a drain");
    }
}
