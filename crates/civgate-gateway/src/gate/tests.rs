//! Unit tests of `gate`.

use super::{body::Framing, observe::http_refusal, *};

#[test]
fn only_post_with_a_grpc_content_type_passes() {
    let headers = |ct: &str| {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
        h
    };
    let post = http::Method::POST;
    for (method, ct, want) in [
        (&post, "application/grpc", None),
        (&post, "application/grpc+proto", None),
        (&post, "application/grpc;charset=utf-8", None),
        (&post, "application/grpc-web", Some(415)),
        (&post, "application/json", Some(415)),
        (&http::Method::GET, "application/grpc", Some(405)),
    ] {
        assert_eq!(
            http_refusal(method, &headers(ct)).map(|s| s.as_u16()),
            want,
            "{method} {ct}"
        );
    }
    assert_eq!(
        http_refusal(&post, &http::HeaderMap::new()).map(|s| s.as_u16()),
        Some(415)
    );
}

#[test]
fn long_paths_are_cut() {
    assert_eq!(bounded_path("/a/b"), "/a/b");
    let long = format!("/{}", "x".repeat(10_000));
    let cut = bounded_path(&long);
    assert_eq!(cut.len(), MAX_PATH + "…".len());
    assert!(cut.ends_with('…'));
}

#[test]
fn framing_finds_each_announced_length_across_chunks() {
    let mut f = Framing::default();
    let msg = |len: u32| {
        let mut v = vec![0u8];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend(std::iter::repeat_n(7u8, len as usize));
        v
    };
    let mut all = msg(3);
    all.extend(msg(0));
    all.extend(msg(70_000));
    // Fed in awkward pieces: a prefix split across chunks, two messages in one chunk.
    let mut seen = Vec::new();
    for chunk in all.chunks(4) {
        seen.extend(f.read(chunk));
    }
    assert_eq!(seen, [3, 0, 70_000]);
    // Only a prefix: its length is known before any of the message arrives.
    let mut f = Framing::default();
    assert_eq!(f.read(&msg(4_190_000)[..5]), [4_190_000]);
}

#[test]
fn the_byte_budget_is_all_or_nothing_with_an_equal_share_past_half() {
    let b = ByteBudget::new(12);
    // One owner alone holds at most half.
    assert!(b.take("a", 6));
    assert!(!b.take("a", 1));
    // Past half, three owners holding bytes: 4 each at most.
    assert!(b.take("b", 3));
    assert!(b.take("c", 1));
    assert!(!b.take("b", 2));
    assert!(b.take("b", 1));
    assert!(!b.take("c", 4));
    assert_eq!(b.held(), 11);
    b.give_back("a", 6);
    b.give_back("b", 4);
    b.give_back("c", 1);
    assert_eq!(b.held(), 0);
    assert!(!b.take("a", 13));
}
