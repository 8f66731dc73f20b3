use super::*;

fn row(topic: &str, key: &str) -> FedRow {
    FedRow {
        id: Uuid::now_v7(),
        topic: topic.into(),
        partition_key: key.into(),
    }
}

fn keys(t: Take) -> (Vec<(String, String)>, Receipt) {
    match t {
        Take::Keys(k, r) => (k, r),
        Take::Scan => panic!("a scan"),
        Take::Nothing => panic!("nothing"),
    }
}

/// A feed at position 0 with hourly scans, whose first claim scanned and
/// found no rows.
fn scanned_feed() -> Arc<KeyFeed> {
    let feed = KeyFeed::new(Duration::from_secs(3600), 0);
    assert!(matches!(feed.take(1), Take::Scan), "the first claim scans");
    feed.scanned(false);
    feed
}

/// The key list of one topic and key.
fn one_key(topic: &str, key: &str) -> Vec<(String, String)> {
    vec![(topic.to_string(), key.to_string())]
}

/// Walks the parked key `key` of topic `t` each time it comes back, until it
/// is left to the scans; `held` are the topics the claims hold.
fn walk_parked(feed: &Arc<KeyFeed>, key: &str, held: &[String]) {
    for _ in 0..PARK.len() {
        std::thread::sleep(Duration::from_millis(60));
        let (k, mut r) = keys(feed.take(10));
        assert_eq!(k, one_key("t", key));
        r.claimed(&HashSet::new(), false, held);
    }
}

#[test]
fn the_position_waits_for_every_earlier_transaction() {
    let feed = KeyFeed::new(Duration::from_secs(3600), 10);
    let acked = feed.acked();
    assert!(matches!(feed.take(10), Take::Scan), "the first claim scans");
    feed.scanned(false);
    assert!(matches!(feed.take(10), Take::Nothing));
    feed.push(20, vec![row("t", "a"), row("t", "a")]);
    feed.push(30, vec![row("t", "b")]);
    let (k1, r1) = keys(feed.take(2));
    assert_eq!(k1, one_key("t", "a"));
    let (k2, r2) = keys(feed.take(2));
    assert_eq!(k2, one_key("t", "b"));
    drop(r2);
    assert_eq!(*acked.borrow(), 10, "30 waits for 20");
    drop(r1);
    assert_eq!(*acked.borrow(), 30);
    feed.idle_at(40);
    assert_eq!(
        *acked.borrow(),
        40,
        "idle and settled: the keep-alive's position"
    );
}

#[test]
fn an_idle_position_waits_for_open_transactions() {
    let feed = scanned_feed();
    feed.push(5, vec![row("t", "a")]);
    feed.idle_at(9);
    assert_eq!(*feed.acked().borrow(), 0);
    let (_, r) = keys(feed.take(1));
    drop(r);
    assert_eq!(*feed.acked().borrow(), 9);
}

#[test]
fn a_full_claim_gives_back_keys_with_rows_left() {
    let feed = scanned_feed();
    let a = row("t", "a");
    let b = row("t", "b");
    feed.push(5, vec![a.clone(), b.clone()]);
    let (k, mut r) = keys(feed.take(10));
    assert_eq!(k.len(), 2);
    r.claimed(&[a.id].into_iter().collect(), true, &[]);
    drop(r);
    assert_eq!(*feed.acked().borrow(), 0, "b's entry is open");
    let (k, mut r) = keys(feed.take(10));
    assert_eq!(k, one_key("t", "b"));
    r.claimed(&HashSet::new(), false, &[]);
    drop(r);
    assert_eq!(*feed.acked().borrow(), 0, "parked: walked again shortly");
    assert!(matches!(feed.take(10), Take::Nothing), "not at once");
    walk_parked(&feed, "b", &[]);
    assert_eq!(*feed.acked().borrow(), 5, "then left to the scans");
    assert!(matches!(feed.take(10), Take::Nothing));
}

#[test]
fn a_due_scan_goes_before_waiting_keys() {
    let feed = KeyFeed::new(Duration::from_millis(30), 0);
    assert!(matches!(feed.take(1), Take::Scan));
    feed.scanned(false);
    feed.push(5, vec![row("t", "a"), row("t", "b")]);
    let (_, r) = keys(feed.take(1));
    drop(r);
    std::thread::sleep(Duration::from_millis(40));
    assert!(matches!(feed.take(1), Take::Scan), "due: before the keys");
    feed.scanned(true);
    let (k, r) = keys(feed.take(1));
    assert_eq!(k, one_key("t", "b"), "then the keys");
    drop(r);
    assert!(
        matches!(feed.take(1), Take::Scan),
        "no keys, scans finding rows"
    );
}

#[test]
fn a_large_transaction_is_pushed_at_once() {
    let feed = KeyFeed::new(Duration::from_secs(3600), 0);
    let rows: Vec<FedRow> = (0..200_000)
        .map(|i| row("t", &format!("k{}", i % 100_000)))
        .collect();
    feed.push(1, rows);
    assert_eq!(feed.waiting(), 100_000, "one entry per key");
}

#[test]
fn a_resent_transaction_is_ignored() {
    let feed = KeyFeed::new(Duration::from_secs(3600), 10);
    assert!(matches!(feed.take(10), Take::Scan));
    feed.scanned(false);
    feed.push(20, vec![row("t", "a")]);
    feed.push(20, vec![row("t", "a")]);
    feed.push(15, vec![row("t", "b")]);
    assert_eq!(feed.waiting(), 1, "20 again and 15 were seen already");
}

#[test]
fn a_scan_never_goes_twice_before_waiting_keys() {
    let feed = KeyFeed::new(Duration::from_millis(0), 0);
    feed.push(5, vec![row("t", "a"), row("t", "b")]);
    assert!(matches!(feed.take(1), Take::Scan), "due");
    feed.scanned(true);
    let (_, r) = keys(feed.take(1));
    drop(r);
    std::thread::sleep(Duration::from_millis(15));
    assert!(matches!(feed.take(1), Take::Scan), "due again");
    let (_, r) = keys(feed.take(1));
    drop(r);
}

#[test]
fn a_partly_handed_out_entry_settles_in_two_parts() {
    let feed = scanned_feed();
    let (a1, a2) = (row("t", "a"), row("t", "a"));
    feed.push(5, vec![a1.clone(), a2.clone()]);
    let (_, mut first) = keys(feed.take(10));
    first.claimed(&[a1.id].into_iter().collect(), true, &[]);
    let (k, mut second) = keys(feed.take(10));
    assert_eq!(k, one_key("t", "a"), "the rest");
    second.claimed(&[a2.id].into_iter().collect(), false, &[]);
    drop(second);
    assert_eq!(
        *feed.acked().borrow(),
        0,
        "the first part's batch is not written"
    );
    drop(first);
    assert_eq!(*feed.acked().borrow(), 5);
}

#[test]
fn a_failed_claim_gives_its_keys_back() {
    let feed = scanned_feed();
    feed.push(5, vec![row("t", "a")]);
    let (_, r) = keys(feed.take(10));
    r.give_back();
    assert_eq!(*feed.acked().borrow(), 0);
    assert_eq!(feed.waiting(), 1);
}

#[test]
fn other_topics_settle_and_held_keys_park_even_when_full() {
    let feed = scanned_feed();
    let (held, other, hot) = (row("t", "held"), row("x", "k"), row("t", "hot"));
    feed.push(5, vec![held.clone(), other.clone(), hot.clone()]);
    let (_, mut r) = keys(feed.take(10));
    r.claimed(&[hot.id].into_iter().collect(), true, &["t".to_string()]);
    drop(r);
    assert_eq!(
        feed.waiting(),
        0,
        "held: parked, not requeued; other topic: settled"
    );
    walk_parked(&feed, "held", &["t".to_string()]);
    assert_eq!(*feed.acked().borrow(), 5);
}

#[test]
fn scans_go_on_while_they_find_rows() {
    let feed = KeyFeed::new(Duration::from_secs(3600), 0);
    assert!(matches!(feed.take(1), Take::Scan));
    feed.scanned(true);
    assert!(matches!(feed.take(1), Take::Scan));
    feed.scanned(false);
    assert!(matches!(feed.take(1), Take::Nothing));
}
