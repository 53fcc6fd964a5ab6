use proto::{MessageId, seal::MAX_CLOCK_SKEW_SECS};

use super::{
    check::legacy_accepted,
    mailbox::{HeldVerdict, MailVerdict, held_verdict, mail_verdict},
    *,
};

fn name(text: &str) -> Username {
    Username::new(text).unwrap()
}

#[test]
fn mail_is_stored_held_left_asked_for_again_or_refused_by_its_check() {
    let plaintext = Plaintext {
        id: MessageId::random(),
        from: name("bob"),
        to: name("alice"),
        sent_at_ms: 1,
        body: "hi".into(),
        receipt: None,
    };
    // From a sender whose keys are pinned here.
    let verdict = |checked| mail_verdict(checked, || true);
    assert!(matches!(
        verdict(Ok(Checked::Open(plaintext))),
        MailVerdict::Store(_)
    ));
    assert!(matches!(verdict(Ok(Checked::Seen)), MailVerdict::Seen));
    assert!(matches!(
        verdict(Err(Refusal::Transient(Unavailable::NoOutcome))),
        MailVerdict::LeaveForLater(_)
    ));
    assert!(matches!(
        verdict(Err(Refusal::KeyChanged)),
        MailVerdict::Hold
    ));
    // A few minutes fast is kept until it opens; far ahead is refused for good.
    let ahead = |ahead_secs| verdict(Err(Refusal::Bad(OpenError::ClockSkew { ahead_secs })));
    assert!(matches!(
        ahead(MAX_CLOCK_SKEW_SECS + MAIL_CLOCK_WAIT_SECS),
        MailVerdict::DatedAhead { .. }
    ));
    assert!(matches!(
        ahead(MAX_CLOCK_SKEW_SECS + MAIL_CLOCK_WAIT_SECS + 1),
        MailVerdict::Refuse(_)
    ));
    assert!(matches!(
        verdict(Err(Refusal::Bad(OpenError::Replayed(MessageId::random())))),
        MailVerdict::Refuse(_)
    ));
    assert!(matches!(
        verdict(Err(Refusal::Blocked)),
        MailVerdict::Refuse(_)
    ));
    // Sealed in a session lost here: asked for again from a pinned sender, refused (and
    // told) from anyone else.
    let lost = || Refusal::Bad(OpenError::NoSession { peer: name("bob") });
    assert!(matches!(verdict(Err(lost())), MailVerdict::AskAgain));
    assert!(matches!(
        mail_verdict(Err(lost()), || false),
        MailVerdict::Refuse(Refusal::Bad(OpenError::NoSession { .. }))
    ));
}

/// Held mail opened again after `trust` that was sealed in a session lost since (a
/// restored backup) is asked for again from a pinned sender, not dropped; what still cannot
/// open stays held.
#[test]
fn held_mail_is_shown_kept_asked_for_again_or_refused_when_opened_again() {
    let lost = || Err(Refusal::Bad(OpenError::NoSession { peer: name("bob") }));
    assert!(matches!(
        held_verdict(lost(), || true),
        HeldVerdict::AskAgain
    ));
    assert!(matches!(
        held_verdict(lost(), || false),
        HeldVerdict::Refuse(Refusal::Bad(OpenError::NoSession { .. }))
    ));
    assert!(matches!(
        held_verdict(Err(Refusal::KeyChanged), || true),
        HeldVerdict::Keep
    ));
    assert!(matches!(
        held_verdict(Err(Refusal::Transient(Unavailable::NoOutcome)), || true),
        HeldVerdict::Keep
    ));
    assert!(matches!(
        held_verdict(Ok(Accepted::Duplicate), || true),
        HeldVerdict::Opened(Accepted::Duplicate)
    ));
    assert!(matches!(
        held_verdict(
            Err(Refusal::Bad(OpenError::Replayed(MessageId::random()))),
            || true
        ),
        HeldVerdict::Refuse(_)
    ));
}

#[test]
fn mail_sealed_the_old_way_is_taken_only_from_before_the_switch() {
    let switch = 1_000_000;
    assert!(legacy_accepted(switch - 1, switch));
    // Kept until its time when the switch came: at most the wait allowed then.
    let allowance = (MAX_CLOCK_SKEW_SECS + MAIL_CLOCK_WAIT_SECS) * 1000;
    assert!(legacy_accepted(switch + allowance - 1, switch));
    assert!(!legacy_accepted(switch + allowance, switch));
    // A user who never had the old kind takes none.
    assert!(!legacy_accepted(1, 0));
}

#[test]
fn a_blocked_sender_hears_blocked_and_a_transient_failure_asks_for_a_retry() {
    assert_eq!(Refusal::Blocked.to_reply().code, ErrorCode::Blocked);
    assert_eq!(
        Refusal::Transient(Unavailable::NoOutcome).to_reply().code,
        ErrorCode::Unavailable
    );
    assert_eq!(Refusal::KeyChanged.to_reply().code, ErrorCode::Refused);
    // Blocked senders are refused silently; what cannot be taken now is not told.
    assert_eq!(Refusal::Blocked.told(), None);
    assert_eq!(Refusal::Transient(Unavailable::NoOutcome).told(), None);
    assert_eq!(
        Refusal::KeyChanged.told(),
        Some(RefusalReason::KeyChanged { held: false })
    );
}

#[test]
fn only_refusals_before_authentication_are_unauthenticated() {
    let forged = Refusal::Bad(OpenError::BadToken { peer: name("bob") });
    assert!(forged.is_unauthenticated());
    assert!(Refusal::NotForMe(name("carol")).is_unauthenticated());
    assert!(!Refusal::KeyChanged.is_unauthenticated());
    assert!(!Refusal::Bad(OpenError::Replayed(MessageId::random())).is_unauthenticated());
    assert!(!Refusal::Blocked.is_unauthenticated());
}
