//! Self-test on load: push bytes through a loopback socket pair placed in the
//! socket map and check they arrive, redirected by sk_msg, both ways.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use mesh_ebpf_common::{OUTBOUND_PORT, SockKey, Stat};

use crate::{Datapath, words_from_ip};

const PAYLOAD: usize = 64 * 1024;

pub(crate) fn run(dp: &mut Datapath) -> Result<(), String> {
    let (client, server) = pair().map_err(|e| format!("loopback socket pair: {e}"))?;
    let netns =
        crate::netns::cookie_of_socket(&client).map_err(|e| format!("SO_NETNS_COOKIE: {e}"))?;
    let ck = key(netns, &client)?;
    let sk = ck.peer();
    let result = (|| {
        dp.socks
            .insert(&ck, std::os::fd::AsRawFd::as_raw_fd(&client), 0)
            .map_err(|e| format!("insert client socket into sm_socks: {e}"))?;
        dp.socks
            .insert(&sk, std::os::fd::AsRawFd::as_raw_fd(&server), 0)
            .map_err(|e| format!("insert server socket into sm_socks: {e}"))?;
        let before = redirected(dp)?;
        transfer(&client, &server, 0x5a).map_err(|e| format!("client -> server: {e}"))?;
        transfer(&server, &client, 0xa5).map_err(|e| format!("server -> client: {e}"))?;
        let after = redirected(dp)?;
        if after < before + 2 {
            return Err(format!(
                "bytes arrived but sk_msg redirected {} messages (expected at least 2)",
                after - before
            ));
        }
        Ok(())
    })();
    let _ = dp.socks.remove(&ck);
    let _ = dp.socks.remove(&sk);
    result
}

fn redirected(dp: &Datapath) -> Result<u64, String> {
    dp.stats()
        .map_err(|e| e.to_string())?
        .get(Stat::MsgRedirected.name())
        .copied()
        .ok_or_else(|| "no msg_redirected counter".to_string())
}

fn pair() -> std::io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind(("127.0.0.1", 0))?;
    if listener.local_addr()?.port() == OUTBOUND_PORT {
        // Never look like a captured flow.
        return pair();
    }
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.set_write_timeout(Some(Duration::from_secs(2)))?;
    }
    Ok((client, server))
}

fn key(netns: u64, s: &TcpStream) -> Result<SockKey, String> {
    let local: SocketAddr = s.local_addr().map_err(|e| e.to_string())?;
    let remote: SocketAddr = s.peer_addr().map_err(|e| e.to_string())?;
    let (family, local_ip) = words_from_ip(local.ip());
    let (_, remote_ip) = words_from_ip(remote.ip());
    Ok(SockKey {
        netns,
        local_ip,
        remote_ip,
        local_port: local.port() as u32,
        remote_port: remote.port() as u32,
        family: family as u32,
        _pad: 0,
    })
}

fn transfer(mut from: &TcpStream, mut to: &TcpStream, fill: u8) -> std::io::Result<()> {
    let data = vec![fill; PAYLOAD];
    // Writer on its own thread: the payload may exceed the socket buffers.
    std::thread::scope(|s| {
        let w = s.spawn(move || from.write_all(&data));
        let mut got = vec![0u8; PAYLOAD];
        let read = to.read_exact(&mut got);
        let wrote = w.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        wrote?;
        read?;
        if got.iter().any(|b| *b != fill) {
            return Err(std::io::Error::other("bytes arrived corrupted"));
        }
        Ok(())
    })
}
